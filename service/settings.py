"""Settings: one pydantic-settings class, every field read from ``HJSERVE_<FIELD>``.

The docstring of each field is the configuration reference.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hjmodel.serving import DEFAULT_TAU, MAX_THREADS

__all__ = ["Settings", "split_names"]


def split_names(text: str) -> list[str]:
    """The names of a comma-separated list (outputs, keys), stripped, empty ones dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _split_keys(value: object) -> object:
    """Accept a JSON list or a comma-separated string for the key lists."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return split_names(text)
    return value


#: ``HJSERVE_*`` variables that name no setting and are not a mistake: the test suite's and the
#: benchmarks' own (``HJSERVE_TEST_*``), and the service links Kubernetes writes into every pod of a
#: namespace for each Service whose name starts with ``hjserve`` (``<NAME>_SERVICE_HOST``,
#: ``<NAME>_SERVICE_PORT[_<port name>]``, ``<NAME>_PORT_<number>_<PROTOCOL>[_PROTO|_PORT|_ADDR]``, and
#: ``<NAME>_PORT`` when it holds ``tcp://...``: :data:`_LINK_VALUE`).
_NOT_SETTINGS = re.compile(r"HJSERVE_TEST_\w+|HJSERVE_(\w+_)?SERVICE_(HOST|PORT(_\w+)?)"
                           r"|HJSERVE_(\w+_)?PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?")
_LINK_PORT = re.compile(r"HJSERVE_(\w+_)?PORT")
_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)


def _not_a_setting(name: str, value: str) -> bool:
    return bool(_NOT_SETTINGS.fullmatch(name) or (_LINK_PORT.fullmatch(name) and _LINK_VALUE.match(value)))


#: The largest value a duration setting takes: one week. gRPC's connection age and its grace (the
#: sum of two of these) travel as milliseconds in C ints, which hold 24.8 days.
MAX_DURATION_S = 7 * 24 * 3600
#: grpcio's channel arguments (message size, concurrent calls) are C ints, and so is the model config's
#: max_batch_size in gRPC (max_queue_size a uint32).
MAX_C_INT = 2**31 - 1


class Settings(BaseSettings):
    """Configuration of one hjserve process (environment prefix ``HJSERVE_``)."""

    # hide_input_in_errors: a refused setting is named, never printed with the others' values (the keys);
    # allow_inf_nan: every number is finite (an infinite timeout or connection age crashed the startup,
    # an infinite default tau certified nothing)
    model_config = SettingsConfigDict(env_prefix="HJSERVE_", extra="ignore", validate_default=True,
                                      hide_input_in_errors=True, allow_inf_nan=False)

    model_repository: Path = Path("models")
    """Model repository root: ``<root>/<model_name>/<version>/`` with numeric version directories,
    each holding ``model.onnx`` and/or ``model.pt`` + ``model.json``."""

    host: str = "0.0.0.0"
    """Interface the HTTP server binds to."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port of the HTTP server."""

    grpc_port: int | None = Field(None, ge=0, le=65535)
    """TCP port of the gRPC server (KServe V2 / Triton ``inference.GRPCInferenceService``, served from
    the same dataplane as HTTP); unset (the default of a bare process): no gRPC server. ``make serve``,
    the Docker images and the Kubernetes manifests set it to 8001, Triton's gRPC port."""

    grpc_max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=MAX_C_INT)
    """Largest gRPC message received or sent (the gRPC twin of ``max_body_bytes``). A ``ModelInfer``
    call reserves twice this in ``max_request_memory_bytes`` while its message is received (a bound:
    the message's size is not known until it has arrived), and an open ``ModelStreamInfer`` stream
    while it awaits its next message, so it also sets how many calls and open streams receive at
    once (with the defaults 32; the others wait for room): with many long-lived streams, lower it
    to the messages you expect."""

    grpc_max_connection_age_s: float = Field(600.0, gt=0.0, le=MAX_DURATION_S)
    """A gRPC connection is asked to go away (GOAWAY; clients reconnect) after this long, and closed
    ``body_timeout_s + request_timeout_s`` later with whatever calls it still holds. At most
    ``max_connections`` calls run at once, counted from when they open -- before their message has
    arrived -- so without this a call that never sends its message would hold its slot forever
    (the gRPC twin of ``body_timeout_s``; the ±10% jitter is grpc's)."""

    tls_cert_file: Path | None = None
    """PEM certificate (chain) of the server: with ``tls_key_file``, both transports serve TLS only
    (HTTPS, and gRPC over TLS) on their ports. Unset: plaintext, for a server on loopback or behind
    something that ends TLS (an ingress, a service mesh). Checked at startup (readable, PEM, matching
    its key); TLS 1.2 at least."""

    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``, unencrypted (a key with a passphrase is refused: the
    server cannot ask for it); keep it readable by the server's user only."""

    tls_client_ca_file: Path | None = None
    """PEM certificate(s) of the authority that signs client certificates: set, both transports
    require mutual TLS -- a client without a certificate from it is refused during the handshake,
    before any request (API keys still apply on top). Needs ``tls_cert_file``."""

    tls_reload_s: float = Field(60.0, ge=0.0, le=MAX_DURATION_S)
    """Seconds between two looks at the TLS files: changed files that pass the startup checks are
    served to new connections without a restart (a renewed certificate, a rotated Kubernetes Secret);
    ones that do not are logged and the previous certificate goes on. 0: read once, at startup."""

    model_control_mode: Literal["none", "explicit", "poll"] = "none"
    """How the model repository changes, as in Triton: ``none`` (the default, as Triton's) -- every
    model on disk loads at startup and what is served never changes (load / unload calls are
    refused: a server nobody configured cannot be emptied by an anonymous unload); ``explicit`` --
    every model on disk loads at startup, then only the repository extension's load / unload calls
    change what is served (give them an ``admin_key``);
    ``poll`` -- the repository is rescanned every ``repository_poll_s`` seconds: a new model or
    version folder is loaded, a changed one reloaded, a removed one unloaded (load / unload calls
    are then refused, like Triton's)."""

    repository_poll_s: float = Field(15.0, gt=0.0, le=MAX_DURATION_S)
    """Seconds between two scans of the repository in ``poll`` mode."""

    default_outputs: str = "prediction,probabilities,certified_radius,ood_flag"
    """Outputs of a V2 request that names none: ``all`` (the protocol's rule: every output) or a
    comma-separated list of output names (a model gets those it has). Reported per model as the
    ``default_outputs`` parameter of its config. Requests can always name outputs or use the
    ``diagnostics`` parameter."""

    monitored_outputs: str = "prediction,ood_flag,ood_component,ood_score,hallucination_flag,energy_gap"
    """Serving outputs computed for every row, whether its request asks for them or not, for the
    diagnostic metrics (``hjserve_ood_flags_total``, ``hjserve_hallucination_flags_total``,
    ``hjserve_predictions_total`` and the OOD score and energy gap histograms; ``prediction`` always): ``all`` or a comma-separated list of output names. The
    rest of a row's diagnostics is computed only when its batch asks for them (``pruned_graphs``), so
    the certified-radius histogram observes the rows whose requests asked for the radius -- every
    request that names no outputs, by default -- unless ``certified_radius`` is listed here."""

    pruned_graphs: int = Field(8, ge=0)
    """Graphs cut down to the outputs a batch needs that each model version may build (onnxruntime
    runs every node of a graph whichever outputs are fetched): a batch that needs no certified radius
    skips its ~70% of the graph. Each is built the first time a set of outputs is asked for, on a
    thread of its own (that batch runs the whole graph; the values are the same bit for bit), and
    holds the constants it reads. 0: every batch runs the whole graph."""

    torch_static_rows: int = Field(16, ge=0)
    """The torch backend runs a call of at most this many rows (and no more than the runtime ran within
    1 ms when the model loaded: ``hjmodel.artifact.STATIC_CALL_S``) on TorchScript's static runtime
    instead of its interpreter: the same operations, bit for bit, in 0.79-0.86x the time at batch 1
    (``bench/results/ab_static_runtime.md``). The runtime holds Python's lock while it runs, so the
    event loop waits for such a call (about 1 ms at most); 0: always the interpreter, which lets
    the loop run beside the graph. onnxruntime's backend ignores it."""

    pruned_graph_mb: float = Field(256.0, ge=0.0)
    """Most megabytes of graph the pruned graphs of one model version hold together: an onnxruntime
    session copies the constants its graph reads (a large memory model's support points are most of
    its file); a torch trace shares the module's tensors and counts only the values it folded at load
    (``TracedModule.folded_bytes``). A graph that does not
    fit is not kept (logged): its batches run the whole graph."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run: ``cuda`` when available under ``auto``, else ``cpu``. ``cuda`` fails a model's
    load when no GPU runtime is present."""

    backend: Literal["auto", "onnx", "torch"] = "auto"
    """Backend preference: ``onnx`` (onnxruntime on ``model.onnx``), ``torch`` (``model.pt`` +
    ``model.json``) or ``auto`` (ONNX when the version has ``model.onnx``, else torch)."""

    intra_op_threads: int = Field(0, ge=0, le=MAX_THREADS)
    """Threads each backend may use inside one operator; 0 lets the library decide (at most
    ``hjmodel.serving.MAX_THREADS``, 256: each graph of each model gets its own, and far more than the
    cores only slows onnxruntime down)."""

    intra_op_spinning: bool = False
    """Whether onnxruntime's intra-op threads busy-wait for work between operators (its own default)
    instead of sleeping. Off: the spinning threads take cores the event loop, the other models and
    co-located clients need (``bench/results/ab_server_spinning*.md``); turn it on for a model with
    cores of its own, where it saves each operator a wake-up (``bench/results/session_threads.md``).
    Nothing spins with ``intra_op_threads=1``."""

    max_batch_size: int = Field(64, ge=1, le=MAX_C_INT)
    """Largest number of rows the dynamic batcher sends to a backend at once (advertised in the model
    config). Larger requests are split into chunks of this size."""

    max_queue_delay_ms: float = Field(0.0, ge=0.0, le=60_000.0)
    """How long the dynamic batcher waits for more rows after the first request of a batch. 0 (Triton's
    default) runs at once; batches still form from the requests that queue while a batch computes. At
    most a minute."""

    inline_max_ms: float = Field(1.0, ge=0.0)
    """A REST request that is the only one in flight (no gRPC call either; at most 16 rows) runs its
    serving graph on the event loop instead of the model's thread (an explanation graph still runs on
    the explanation thread, meanwhile) when the model's recent small calls for the same outputs took
    at most this long: it saves the hand-off to the thread and back (two wake-ups, ~0.1 ms) when
    there is nothing to overlap, and holds the loop for about this long at most. Only with
    ``max_queue_delay_ms`` 0 (a delay asks every request to wait for company). 0: always the thread
    (``bench/results/ab_server_inline.md``)."""

    max_queue_size: int = Field(256, ge=1, le=MAX_C_INT)
    """Requests (or request chunks) that may wait per model version; beyond it requests are rejected
    at once with 503 and ``Retry-After``."""

    request_timeout_s: float = Field(30.0, gt=0.0, le=MAX_DURATION_S)
    """Longest time a request may wait for its result (queue + compute) before it fails with 504."""

    retry_after_s: int = Field(1, ge=0)
    """Value of the ``Retry-After`` header on 503 overload responses, in seconds."""

    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    """Largest request body accepted (413 beyond it, checked while it arrives, before any parsing):
    every JSON or binary V2 / V1 body and every JSON batch-attribution body."""

    max_request_memory_bytes: int = Field(4 * 1024 * 1024 * 1024, ge=1)
    """Most memory the inference bodies being read and decoded may take, all requests together (REST
    V2 / V1, JSON batch bodies, gRPC), as estimated before each is parsed: a body twice its size
    while it is read, its JSON part 52 times its size in all (the most the JSON parser takes for any
    body, deeply nested lists: ~50x with the body; numbers take ~13x), a gRPC message twice its size;
    and an answer, from when it is encoded until its client has taken it (REST, ``send_timeout_s``)
    or grpc has sent it (gRPC: ``send_timeout_s`` for a client that reads nothing, else at most the
    connection's age). A
    request that would take the total past it gets 503 ``request_memory_full`` with ``Retry-After``;
    a body (or answer) whose estimate alone exceeds it, 413. The default admits one 64 MiB JSON body (``max_body_bytes``:
    3.25 GiB) and bounds what any number of connections can make the server hold; size it to the
    process's memory limit with ``max_body_bytes`` x 52 below it."""

    max_stream_bytes: int = Field(4 * 1024 * 1024 * 1024, ge=1)
    """Largest streamed batch-attribution body (NDJSON or V2 binary), spooled to a temporary file
    while it arrives (413 beyond it)."""

    max_spool_bytes: int = Field(4 * 1024 * 1024 * 1024, ge=1)
    """Most bytes the batch-attribution bodies being received and answered may hold at once, all
    jobs together (each body is spooled: its first 8 MiB in memory, the rest in a file under
    ``spool_dir``; the bytes count until the job ends). A job that would take the total past it gets
    503 ``spool_full`` with ``Retry-After``; a body larger than the limit alone, 413. Keep it below
    the free space of ``spool_dir`` -- in Kubernetes below the ``/tmp`` volume's ``sizeLimit``, past
    which the kubelet evicts the pod."""

    spool_dir: Path | None = None
    """Directory of the batch bodies' spool files (unset: the system's temporary directory,
    ``$TMPDIR`` or ``/tmp``); must exist. A write that fails there (a full disk) answers 507
    ``insufficient_storage``."""

    max_line_bytes: int = Field(1024 * 1024, ge=16)
    """Longest NDJSON line of a batch-attribution body (413 for that line, before it is parsed)."""

    max_header_bytes: int = Field(64 * 1024, ge=1024)
    """Largest request head (request line and headers) in bytes: beyond it the connection gets 431
    ``headers_too_large`` and is closed while the head is still arriving, so none is buffered whole."""

    header_timeout_s: float = Field(10.0, gt=0.0, le=MAX_DURATION_S)
    """Longest time a connection may take to send a complete request head (request line and
    headers), counted from when it opened or got its previous response; then it is closed. gRPC: the
    time a new connection has to send its HTTP/2 preface (and TLS handshake)."""

    body_timeout_s: float = Field(120.0, gt=0.0, le=MAX_DURATION_S)
    """Longest time a request body may take to arrive after its head (408 ``body_timeout`` and the
    connection closed beyond it). Applies to every body, streamed batch bodies included. gRPC: how
    long a ModelInfer call waits for room in ``max_request_memory_bytes`` and then for its message
    (DEADLINE_EXCEEDED beyond it); a ModelStreamInfer stream silent this long while another call
    waits for room is ended (DEADLINE_EXCEEDED), giving back the room held for its next message."""

    send_timeout_s: float = Field(60.0, gt=0.0, le=MAX_DURATION_S)
    """A response its client is not reading (the socket takes no more of it) counts against
    ``max_request_memory_bytes`` while it waits in the server's buffer; a client that takes less
    than 64 KiB of it in this long has its connection closed, and the bytes are freed (as nginx's
    ``send_timeout``, whose default it shares: a batch client that stops reading its stream for
    longer, say to write what it read, loses the job).

    gRPC: a connection, idle or not, is pinged after half of this without a ping, and closed when
    the ping is not answered within the other half, so a client that reads nothing from its
    connection (hung, stopped, or a socket that only sent its preface) loses it and its unsent
    answers within this long. A client that reads its connection
    but grants the server no flow-control window keeps its call until ``grpc_max_connection_age_s``
    (grpcio cannot end a call once its handler has returned)."""

    keep_alive_s: float = Field(5.0, gt=0.0, le=MAX_DURATION_S)
    """How long an idle keep-alive connection stays open between requests."""

    shutdown_grace_s: float = Field(10.0, gt=0.0, le=3600.0)
    """On SIGTERM or SIGINT the server drains for at most this long: it reports itself not ready on
    both transports, takes no new connections or gRPC calls, and lets the requests in flight finish;
    a batch-attribution stream that would outlast it ends with a ``shutting_down`` error line (every
    row before that line's ``row`` answered) before the grace runs out. Whatever still runs after it
    is cancelled. Keep Kubernetes' ``terminationGracePeriodSeconds`` above the preStop hook plus
    this."""

    max_connections: int = Field(1024, ge=1, le=MAX_C_INT)
    """Most concurrent connections / requests the server handles; beyond it new requests get 503
    at once (uvicorn's ``limit_concurrency``). gRPC: as many connections (grpc closes the ones
    beyond at once) and as many calls at once (RESOURCE_EXHAUSTED beyond)."""

    batch_max_rows: int = Field(10_000_000, ge=1)
    """Largest number of rows one batch-attribution job may send."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Keys accepted on inference and model routes (``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``); JSON list or comma-separated. Empty: no authentication."""

    admin_key: SecretStr | None = None
    """Key required by the model repository extension (index, load, unload). Unset: those routes
    take the API keys like inference does (open only when no API key is set either)."""

    default_top_k: int = Field(5, ge=1)
    """Top-k of the ``attribution_*`` / ``label_sensitivity`` outputs when a request gives none
    (capped by the model's ``top_k_max``)."""

    default_tau: float = Field(DEFAULT_TAU, gt=0.0)
    """Tolerance of the regression certificate when a request gives no ``tau`` parameter."""

    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    """Log level of the service and of uvicorn (``info`` writes one access line per request)."""

    tracing: Literal["off", "on", "otlp", "console"] = "off"
    """OpenTelemetry tracing (the ``tracing`` extra): a server span per request with children decode,
    queue, compute, encode; the trace id in the access log and the ``X-Trace-ID`` header. ``on``: the
    process's tracer provider; ``otlp``: the SDK with the OTLP/HTTP exporter (``OTEL_EXPORTER_OTLP_*``
    variables); ``console``: spans printed; ``off``: nothing (no cost)."""

    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line (``ts``, ``level``, ``logger``, ``message``, and for
    access lines ``request_id``, ``method``, ``route``, ``model``, ``version``, ``status``,
    ``duration_ms``); ``text``: a readable line."""

    @model_validator(mode="after")
    def _every_variable_is_a_setting(self) -> Settings:
        """An ``HJSERVE_*`` variable that names no setting is refused, not ignored: a misspelt
        ``HJSERVE_API_KEY`` (for ``HJSERVE_API_KEYS``) would otherwise serve with no key at all."""
        known = {f"HJSERVE_{name.upper()}" for name in type(self).model_fields}
        unknown = sorted(name.upper() for name, value in os.environ.items()
                         if name.upper().startswith("HJSERVE_") and name.upper() not in known
                         and not _not_a_setting(name.upper(), value))
        if unknown:
            hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, 1, 0.75))
                     else name for name in unknown]
            raise ValueError(f"environment variable(s) {', '.join(hints)} name no setting; every HJSERVE_ "
                             "variable must (HJSERVE_TEST_* are the test suite's; Kubernetes' service links "
                             "are ignored)")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        from service.tls import check_files

        check_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        return self

    @field_validator("port", "grpc_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: object) -> object:
        if isinstance(value, str) and _LINK_VALUE.match(value.strip()):
            raise ValueError(f"{value!r} is the address Kubernetes writes into HJSERVE_PORT (HJSERVE_GRPC_PORT) "
                             "for a Service named hjserve (hjserve-grpc), not a port: set the port explicitly, or "
                             "enableServiceLinks: false in the pod spec")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        return _split_keys(value)

    @field_validator("api_keys", "admin_key")
    @classmethod
    def _presentable(cls, value: list[SecretStr] | SecretStr | None) -> list[SecretStr] | SecretStr | None:
        """Every key is one a client can present: printable ASCII (what an HTTP header and gRPC
        metadata carry), without surrounding spaces (``auth.key_from`` strips them) and not empty. Any
        other would lock every client out of what it guards. The message never holds the key."""
        for key in value if isinstance(value, list) else [value] if value is not None else []:
            text = key.get_secret_value()
            if not text or text != text.strip() or not all(" " <= ch <= "~" for ch in text):
                raise ValueError("a key must be printable ASCII, not empty, without surrounding spaces "
                                 "(no client could present this one)")
        return value

    @field_validator("monitored_outputs", "default_outputs")
    @classmethod
    def _known_outputs(cls, value: str, info: ValidationInfo) -> str:
        """``all``, or names of outputs: the serving outputs for ``monitored_outputs`` (computed for
        every row), any model's outputs for ``default_outputs`` (a model gets those it has), which must
        also name at least one, each once (a misspelt name was dropped unread, a name twice made every
        default request a 400)."""
        from hjmodel.serving import EXPLAIN_OUTPUTS, OUTPUTS

        defaults = info.field_name == "default_outputs"
        names = split_names(value)
        if defaults and not names:
            raise ValueError("default_outputs must name at least one output (or 'all')")
        known = {o.name for o in ((*OUTPUTS, *EXPLAIN_OUTPUTS) if defaults else OUTPUTS)}
        unknown = [n for n in names if n not in known]
        if names != ["all"] and unknown:
            kind = "the outputs" if defaults else "the serving outputs"
            raise ValueError(f"unknown output(s) {unknown}: 'all' or names of {kind}")
        if defaults and len(set(names)) != len(names):
            raise ValueError("default_outputs names an output twice")
        return value

    @field_validator("model_repository", "spool_dir", "tls_cert_file", "tls_key_file", "tls_client_ca_file",
                     mode="before")
    @classmethod
    def _a_path_is_not_empty(cls, value: object, info: ValidationInfo) -> object:
        """An empty variable is no path: pathlib reads "" as "." (the working directory), so an empty
        ``HJSERVE_SPOOL_DIR`` spooled batch bodies there and an empty ``HJSERVE_MODEL_REPOSITORY``
        served the working directory as the repository."""
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{info.field_name} is empty: give a path, or leave the variable unset")
        return value

    @field_validator("model_repository")
    @classmethod
    def _repository_dir(cls, value: Path) -> Path:
        if not value.is_dir():   # a typo served nothing, live and never ready, with no line in the log
            raise ValueError(f"model_repository {str(value)!r} is not an existing directory")
        return value

    @field_validator("spool_dir")
    @classmethod
    def _existing_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"spool_dir {str(value)!r} is not an existing directory")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
