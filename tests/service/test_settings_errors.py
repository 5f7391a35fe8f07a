"""Settings, the error table and the public namespace."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import service
from service import errors
from service.settings import Settings


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("HJSERVE_PORT", "9123")
    monkeypatch.setenv("HJSERVE_API_KEYS", "k1, k2")
    monkeypatch.setenv("HJSERVE_ADMIN_KEY", "root")
    monkeypatch.setenv("HJSERVE_DEVICE", "cpu")
    monkeypatch.setenv("HJSERVE_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.port == 9123 and s.device == "cpu" and s.log_level == "debug"
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert s.admin_key.get_secret_value() == "root"
    assert "root" not in repr(s)


def test_monitored_outputs_must_be_serving_outputs():
    assert Settings(monitored_outputs="all").monitored_outputs == "all"
    assert Settings(monitored_outputs="ood_flag, certified_radius").monitored_outputs
    for bad in ("ood_flags", "all,prediction", "integrated_gradients"):   # a typo; an explanation output
        with pytest.raises(ValueError, match="unknown output"):
            Settings(monitored_outputs=bad)


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
