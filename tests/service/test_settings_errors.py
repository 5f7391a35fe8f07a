"""Settings, the error table and the public namespace."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys

import pytest

import service
from service import errors
from service.settings import Settings


@pytest.fixture(autouse=True)
def _a_repository(monkeypatch, tmp_path):
    """Every Settings() here reads an existing (empty) repository, wherever the tests run from."""
    monkeypatch.setenv("HJSERVE_MODEL_REPOSITORY", str(tmp_path))


@pytest.mark.parametrize("where", ["missing", "a_file"])
def test_the_model_repository_must_be_an_existing_directory(tmp_path, where):
    """On dc0b395 a repository path that did not exist (a typo), or a file, served: live, never ready,
    and not a line in the log to say why. Refused at load, as Triton refuses it."""
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="model_repository .* is not an existing directory"):
        Settings(model_repository=tmp_path / where)


@pytest.mark.parametrize("name", ["HJSERVE_MODEL_REPOSITORY", "HJSERVE_SPOOL_DIR", "HJSERVE_TLS_CERT_FILE",
                                  "HJSERVE_TLS_KEY_FILE", "HJSERVE_TLS_CLIENT_CA_FILE"])
def test_an_empty_path_setting_is_refused_not_read_as_the_working_directory(monkeypatch, tmp_path, name):
    """pathlib reads "" as ".": on 9fa040c an empty HJSERVE_SPOOL_DIR spooled batch bodies into the
    working directory and an empty HJSERVE_MODEL_REPOSITORY served the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, " ")
    with pytest.raises(ValueError, match=f"{name[8:].lower()} is empty: give a path, or leave the variable unset"):
        Settings()


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("HJSERVE_PORT", "9123")
    monkeypatch.setenv("HJSERVE_API_KEYS", "k1, k2")
    monkeypatch.setenv("HJSERVE_ADMIN_KEY", "adm-7e1c-secret")
    monkeypatch.setenv("HJSERVE_DEVICE", "cpu")
    monkeypatch.setenv("HJSERVE_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.port == 9123 and s.device == "cpu" and s.log_level == "debug"
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert s.admin_key.get_secret_value() == "adm-7e1c-secret"
    assert "adm-7e1c-secret" not in repr(s)


@pytest.mark.parametrize(("name", "meant"), [("HJSERVE_API_KEY", "HJSERVE_API_KEYS"),
                                             ("HJSERVE_MAX_BATCHSIZE", "HJSERVE_MAX_BATCH_SIZE"),
                                             ("hjserve_admin_keys", "HJSERVE_ADMIN_KEY")])
def test_a_misspelt_setting_in_the_environment_is_refused(monkeypatch, name, meant):
    """On f87d4bb HJSERVE_API_KEY=secret (for HJSERVE_API_KEYS) served with no key at all: pydantic-
    settings reads the names it declares and nothing else."""
    monkeypatch.setenv(name, "secret")
    with pytest.raises(ValueError, match=rf"{name.upper()}.*did you mean {meant}"):
        Settings()


def test_what_the_environment_may_hold_besides_settings(monkeypatch):
    """The test suite's own variables, and Kubernetes' service links for Services named hjserve...
    (written into every pod of the namespace unless enableServiceLinks is false)."""
    links = {"HJSERVE_TEST_MODELS": "/models", "HJSERVE_SERVICE_HOST": "10.0.0.1", "HJSERVE_SERVICE_PORT": "8000",
             "HJSERVE_SERVICE_PORT_HTTP": "8000", "HJSERVE_PORT_8000_TCP": "tcp://10.0.0.1:8000",
             "HJSERVE_PORT_8000_TCP_PROTO": "tcp", "HJSERVE_PORT_8000_TCP_PORT": "8000",
             "HJSERVE_PORT_8000_TCP_ADDR": "10.0.0.1", "HJSERVE_PREDICTOR_SERVICE_HOST": "10.0.0.2",
             "HJSERVE_PREDICTOR_PORT": "tcp://10.0.0.2:80", "HJSERVE_PREDICTOR_PORT_80_UDP_ADDR": "10.0.0.2"}
    for key, value in links.items():
        monkeypatch.setenv(key, value)
    assert Settings().port == 8000
    monkeypatch.setenv("HJSERVE_PREDICTOR_PORT", "80")   # not a link's value: a setting nothing reads
    with pytest.raises(ValueError, match="HJSERVE_PREDICTOR_PORT"):
        Settings()


@pytest.mark.parametrize("name", ["HJSERVE_PORT", "HJSERVE_GRPC_PORT"])
def test_a_service_link_in_a_port_setting_says_what_it_is(monkeypatch, name):
    """A Service named hjserve (or hjserve-grpc) writes HJSERVE_PORT=tcp://...: a port setting that
    holds one is explained, not just refused as a number that does not parse."""
    monkeypatch.setenv(name, "tcp://10.0.0.1:8000")
    with pytest.raises(ValueError, match="enableServiceLinks"):
        Settings()


def test_the_server_does_not_start_on_a_misspelt_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HJSERVE_")}
    env.update(HJSERVE_API_KEYS="k-7f3a-client-secret", HJSERVE_ADMIN_KEYS="admin-9c1e-secret")
    out = subprocess.run([sys.executable, "-m", "service", "--model-repository", str(tmp_path), "--port", "0"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "HJSERVE_ADMIN_KEYS (did you mean HJSERVE_ADMIN_KEY?)" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "secret" not in out.stderr   # the refusal names variables, never prints their values


def test_monitored_outputs_must_be_serving_outputs():
    assert Settings(monitored_outputs="all").monitored_outputs == "all"
    assert Settings(monitored_outputs="ood_flag, certified_radius").monitored_outputs
    for bad in ("ood_flags", "all,prediction", "integrated_gradients"):   # a typo; an explanation output
        with pytest.raises(ValueError, match="unknown output"):
            Settings(monitored_outputs=bad)


def test_default_outputs_must_be_outputs_once_each():
    """On 9ad0da0 HJSERVE_DEFAULT_OUTPUTS=prediction,certified_raduis served the prediction alone (the
    misspelt radius dropped unread: an operator would believe every default answer carried it); an
    empty list answered every default request with no outputs; a name twice made every default
    request a 400. Each is refused at load; the names of any model's outputs, explanations included,
    are taken (a model gets those it has)."""
    assert Settings(default_outputs="all").default_outputs == "all"
    assert Settings(default_outputs="prediction, probabilities, integrated_gradients").default_outputs
    for bad, why in (("prediction,certified_raduis", "unknown output"), ("", "at least one output"),
                     (" , ", "at least one output"), ("prediction,prediction", "twice"),
                     ("all,prediction", "unknown output")):
        with pytest.raises(ValueError, match=why):
            Settings(default_outputs=bad)


FLOAT_SETTINGS = sorted(name for name, field in Settings.model_fields.items() if field.annotation is float)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_a_number_setting_must_be_finite(monkeypatch, name, value):
    """On a21eca0 HJSERVE_REQUEST_TIMEOUT_S=inf or HJSERVE_GRPC_MAX_CONNECTION_AGE_S=inf passed the
    settings and the server died at startup with a traceback (OverflowError); HJSERVE_DEFAULT_TAU=inf
    served every regression row a radius of FLT_MAX, certifying nothing. Every number setting is refused
    at load unless finite, with its name."""
    monkeypatch.setenv(f"HJSERVE_{name.upper()}", value)
    with pytest.raises(ValueError, match=name):
        Settings()


#: (setting, the largest value it takes, a value past it that a2bc700 took and then crashed on or hung)
BOUNDED = [
    ("grpc_max_message_bytes", 2**31 - 1, 2**31),      # grpcio's channel arguments are C ints: OverflowError
    ("max_connections", 2**31 - 1, 2**31),             # likewise (grpcio's maximum_concurrent_rpcs)
    ("grpc_max_connection_age_s", 604_800, 1e300),     # its milliseconds, with the grace, a C int
    ("request_timeout_s", 604_800, 1e300),             # part of that grace
    ("body_timeout_s", 604_800, 1e300),
    ("header_timeout_s", 604_800, 1e300),
    ("keep_alive_s", 604_800, 1e300),
    ("repository_poll_s", 604_800, 1e300),
    ("max_queue_delay_ms", 60_000, 1e300),             # a wait past time_t: every batched request failed
    ("intra_op_threads", 256, 100_000),                # the server never came up (threads per graph)
    ("max_batch_size", 2**31 - 1, 2**31),              # the model config's int32 over gRPC: INTERNAL
    ("max_queue_size", 2**31 - 1, 2**31),              # its uint32 (as a C int, like the others)
]


@pytest.mark.parametrize(("name", "largest", "past"), BOUNDED)
def test_a_setting_past_what_its_consumer_holds_is_refused(monkeypatch, name, largest, past):
    """Each of these passed the settings on a2bc700 (the last two on d9d5781) and then killed the
    startup with a traceback, hung it, or failed requests later; now each has a documented largest value, and a value past it is
    refused at load with the setting's name."""
    monkeypatch.setenv(f"HJSERVE_{name.upper()}", str(largest))
    assert getattr(Settings(), name) == largest
    monkeypatch.setenv(f"HJSERVE_{name.upper()}", str(past))
    with pytest.raises(ValueError, match=name):
        Settings()


def test_the_number_settings_are_found():
    assert {"default_tau", "request_timeout_s", "grpc_max_connection_age_s", "keep_alive_s"} <= set(FLOAT_SETTINGS)


def test_settings_json_list_and_validation(monkeypatch):
    monkeypatch.setenv("HJSERVE_API_KEYS", '["a", "b"]')
    assert len(Settings().api_keys) == 2
    monkeypatch.setenv("HJSERVE_DEVICE", "tpu")
    with pytest.raises(ValueError):
        Settings()


def test_every_setting_is_documented():
    source = inspect.getsource(Settings)
    for name in Settings.model_fields:
        after = source.split(f"\n    {name}:", 1)[1]
        assert after.split("\n", 2)[1].strip().startswith('"""'), f"{name} has no docstring"


def test_every_error_class_has_a_mapping():
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.HJServeError)]
    for cls in classes:
        mapping = errors.lookup(cls)
        assert 400 <= mapping.status < 600 and mapping.error_type
    bad_input = [c for c in classes if issubclass(c, errors.BadRequest)]
    assert all(errors.lookup(c).status in (400, 422) for c in bad_input)
    assert errors.lookup(errors.Overloaded).status == 503
    assert errors.lookup(errors.PayloadTooLarge).status == 413


def test_errors_module_has_no_web_framework():
    source = inspect.getsource(errors)
    assert "fastapi" not in source and "starlette" not in source


def _modules():
    yield service
    for info in pkgutil.walk_packages(service.__path__, "service."):
        if info.name != "service.__main__" and not info.name.endswith("_pb2"):   # generated code
            yield importlib.import_module(info.name)


@pytest.mark.parametrize("module", list(_modules()), ids=lambda m: m.__name__)
def test_all_is_sorted_and_exported(module):
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} has no __all__"
    assert list(names) == sorted(names)
    for name in names:
        assert hasattr(module, name), f"{module.__name__}.{name}"


def test_command_line_choices_are_the_settings_values():
    """Each ``hjserve`` option with choices offers exactly its setting's values (``--model-control-mode``
    once lacked ``none``, the default, so the default could not be named on the command line)."""
    from typing import get_args

    from service.__main__ import _parser

    options = [a for a in _parser()._actions if a.choices is not None]
    assert {a.dest for a in options} >= {"model_control_mode", "device", "backend", "log_level", "tracing"}
    for action in options:
        assert sorted(action.choices) == sorted(get_args(Settings.model_fields[action.dest].annotation)), action.dest


def test_a_malformed_key_list_is_refused_without_its_keys(monkeypatch):
    """A settings error names the field, never prints its value: on f87d4bb a key list that was not
    valid JSON was printed whole in the error (and so in the log of a server that did not start)."""
    monkeypatch.setenv("HJSERVE_API_KEYS", '["k-5d2e-secret", ')
    with pytest.raises(ValueError) as info:
        Settings()
    assert "api_keys" in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize("setting, value", [
    ("HJSERVE_API_KEYS", '["k-5d2e-secret", ""]'),          # an empty key in a JSON list
    ("HJSERVE_API_KEYS", '[" k-5d2e-secret"]'),             # one a client can never present (stripped)
    ("HJSERVE_API_KEYS", '["k-5d2e-secret\\u00e9"]'),       # not ASCII: no HTTP header or gRPC metadata holds it
    ("HJSERVE_API_KEYS", '["k-5d2e\\nsecret"]'),            # a control character
    ("HJSERVE_ADMIN_KEY", " "),
    ("HJSERVE_ADMIN_KEY", "admin-9c1e-secret\t"),
])
def test_a_key_no_client_can_present_is_refused(monkeypatch, setting, value):
    """Clients present keys in an HTTP header or gRPC metadata, stripped of surrounding spaces: on
    a2bc700 a key that could never match that way (empty, padded, non-ASCII, with a control character)
    was accepted, and locked every client out of what it guards (inference, or the repository). Refused
    at load, named, never printed."""
    monkeypatch.setenv(setting, value)
    with pytest.raises(ValueError, match="printable ASCII") as info:
        Settings()
    assert setting.removeprefix("HJSERVE_").lower() in str(info.value) and "secret" not in str(info.value)
