"""Core errors (no transport here) and the one table that maps each to an HTTP status, a gRPC
status code and an ``error_type``.

Every error body the REST transport sends is ``{"error": "<message>", "error_type": "<type>"}``;
the gRPC transport sends the message as the status details and the ``error_type`` in the trailing
metadata. Transport details an error implies (``Retry-After``, ``WWW-Authenticate``, closing the
connection) are derived at each edge from the error's class and typed fields, never stored here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BackendError",
    "BadRequest",
    "BodyTimeout",
    "ClientClosedRequest",
    "ERROR_TABLE",
    "EmptyBatch",
    "ErrorMapping",
    "Forbidden",
    "HJServeError",
    "HeadersTooLarge",
    "InsufficientStorage",
    "InternalError",
    "InvalidDatatype",
    "InvalidHeader",
    "InvalidJSON",
    "InvalidModelName",
    "InvalidParameter",
    "InvalidShape",
    "InvalidValue",
    "MethodNotAllowed",
    "ModelLoadFailed",
    "ModelNotFound",
    "ModelNotReady",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RequestMemoryFull",
    "RequestTimeout",
    "ShuttingDown",
    "SpoolFull",
    "Unauthorized",
    "UnknownInput",
    "UnknownOutput",
    "UnsupportedEncoding",
    "ValidationFailed",
    "error_body",
    "lookup",
]


class HJServeError(Exception):
    """Base of every error the service reports to a client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(HJServeError):
    """The request is malformed in a way no narrower class describes."""


class InvalidJSON(BadRequest):
    """The body (or its JSON header) is not valid JSON of the expected shape."""


class InvalidHeader(BadRequest):
    """A protocol header (e.g. ``Inference-Header-Content-Length``) is invalid."""


class InvalidShape(BadRequest):
    """A tensor's shape does not match its data or the model."""


class InvalidDatatype(BadRequest):
    """A tensor's datatype is unknown or not accepted by the model."""


class InvalidValue(BadRequest):
    """A tensor holds NaN or infinite values (or values that overflow float32)."""


class EmptyBatch(BadRequest):
    """The request has zero rows."""


class InvalidParameter(BadRequest):
    """A request or output parameter has an invalid value."""


class UnknownInput(BadRequest):
    """An input name the model does not have (or a missing input)."""


class UnknownOutput(BadRequest):
    """A requested output name the model does not produce."""


class ValidationFailed(BadRequest):
    """A request body failed schema validation."""


class InvalidModelName(BadRequest):
    """A model name outside the documented pattern (``MODEL_NAME_PATTERN``): never a path."""


class BodyTimeout(HJServeError):
    """The request body did not arrive within ``body_timeout_s`` (the connection is closed)."""


class ClientClosedRequest(HJServeError):
    """The client closed its connection before the answer: the request's work was stopped. Nobody
    reads the response; the status (nginx's 499) is for the access log and the metrics."""


class Unauthorized(HJServeError):
    """Missing or invalid API key."""


class Forbidden(HJServeError):
    """The key is valid but not allowed on this route."""


class NotFound(HJServeError):
    """No route matches the path."""


class MethodNotAllowed(HJServeError):
    """The route exists but not for this HTTP method."""


class ModelNotFound(HJServeError):
    """Unknown model name, or unknown version of a known model."""


class ModelNotReady(HJServeError):
    """The model (version) exists but is not loaded or failed to load."""


class ModelLoadFailed(HJServeError):
    """A repository load request failed (the previous version keeps serving)."""


class PayloadTooLarge(HJServeError):
    """The request body exceeds ``max_body_bytes`` (or the batch exceeds ``batch_max_rows``)."""


class UnsupportedEncoding(HJServeError):
    """The body's ``Content-Encoding`` is not one the server decodes (identity, gzip, deflate)."""


class HeadersTooLarge(HJServeError):
    """The request head (request line and headers) exceeds ``max_header_bytes`` (the connection
    is closed)."""


class Overloaded(HJServeError):
    """The model's queue is full; retry after ``retry_after_s`` seconds (REST: ``Retry-After``;
    gRPC: ``retry-after`` trailing metadata)."""

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestMemoryFull(Overloaded):
    """The inference bodies being decoded already take ``max_request_memory_bytes`` between them;
    retry after ``retry_after_s`` seconds."""


class SpoolFull(Overloaded):
    """The batch bodies being answered already hold ``max_spool_bytes`` between them; retry after
    ``retry_after_s`` seconds."""


class InsufficientStorage(HJServeError):
    """The server could not store a request body: a write to its spool failed (a full disk)."""


class ShuttingDown(Overloaded):
    """The server is shutting down (SIGTERM) and its grace is running out: the work left is not done
    here; send it again, to another replica (a request still waiting then, or the last line of a
    batch stream that would outlast the grace)."""


class RequestTimeout(HJServeError):
    """The request did not get its result within the request timeout."""


class BackendError(HJServeError):
    """The backend failed while running the model on valid input."""


class InternalError(HJServeError):
    """An unexpected failure inside the service."""


@dataclass(frozen=True)
class ErrorMapping:
    """HTTP status, gRPC status code name (``grpc.StatusCode`` member) and machine-readable
    ``error_type`` of one error class."""

    status: int
    error_type: str
    grpc: str


#: The one place that maps errors to HTTP statuses and gRPC codes (Triton's choices: a full queue
#: is UNAVAILABLE, an unknown model NOT_FOUND, a bad request INVALID_ARGUMENT). Ordered most specific first; ``lookup`` walks
#: the class's MRO, so a subclass without an entry inherits its parent's.
ERROR_TABLE: dict[type[HJServeError], ErrorMapping] = {
    InvalidJSON: ErrorMapping(400, "invalid_json", "INVALID_ARGUMENT"),
    InvalidHeader: ErrorMapping(400, "invalid_header", "INVALID_ARGUMENT"),
    InvalidShape: ErrorMapping(400, "invalid_shape", "INVALID_ARGUMENT"),
    InvalidDatatype: ErrorMapping(400, "invalid_datatype", "INVALID_ARGUMENT"),
    InvalidValue: ErrorMapping(400, "invalid_value", "INVALID_ARGUMENT"),
    EmptyBatch: ErrorMapping(400, "empty_batch", "INVALID_ARGUMENT"),
    InvalidParameter: ErrorMapping(400, "invalid_parameter", "INVALID_ARGUMENT"),
    UnknownInput: ErrorMapping(400, "unknown_input", "INVALID_ARGUMENT"),
    UnknownOutput: ErrorMapping(400, "unknown_output", "INVALID_ARGUMENT"),
    InvalidModelName: ErrorMapping(400, "invalid_model_name", "INVALID_ARGUMENT"),
    ValidationFailed: ErrorMapping(400, "validation_error", "INVALID_ARGUMENT"),
    BadRequest: ErrorMapping(400, "bad_request", "INVALID_ARGUMENT"),
    Unauthorized: ErrorMapping(401, "unauthorized", "UNAUTHENTICATED"),
    Forbidden: ErrorMapping(403, "forbidden", "PERMISSION_DENIED"),
    NotFound: ErrorMapping(404, "not_found", "NOT_FOUND"),
    ModelNotFound: ErrorMapping(404, "model_not_found", "NOT_FOUND"),
    MethodNotAllowed: ErrorMapping(405, "method_not_allowed", "UNIMPLEMENTED"),
    BodyTimeout: ErrorMapping(408, "body_timeout", "DEADLINE_EXCEEDED"),
    ClientClosedRequest: ErrorMapping(499, "client_closed_request", "CANCELLED"),
    PayloadTooLarge: ErrorMapping(413, "payload_too_large", "RESOURCE_EXHAUSTED"),
    HeadersTooLarge: ErrorMapping(431, "headers_too_large", "RESOURCE_EXHAUSTED"),
    UnsupportedEncoding: ErrorMapping(415, "unsupported_encoding", "INVALID_ARGUMENT"),
    ModelLoadFailed: ErrorMapping(400, "model_load_failed", "INVALID_ARGUMENT"),
    ModelNotReady: ErrorMapping(503, "model_not_ready", "UNAVAILABLE"),
    SpoolFull: ErrorMapping(503, "spool_full", "UNAVAILABLE"),
    RequestMemoryFull: ErrorMapping(503, "request_memory_full", "UNAVAILABLE"),
    Overloaded: ErrorMapping(503, "overloaded", "UNAVAILABLE"),
    ShuttingDown: ErrorMapping(503, "shutting_down", "UNAVAILABLE"),
    RequestTimeout: ErrorMapping(504, "timeout", "DEADLINE_EXCEEDED"),
    InsufficientStorage: ErrorMapping(507, "insufficient_storage", "RESOURCE_EXHAUSTED"),
    BackendError: ErrorMapping(500, "backend_error", "INTERNAL"),
    InternalError: ErrorMapping(500, "internal_error", "INTERNAL"),
    HJServeError: ErrorMapping(500, "internal_error", "INTERNAL"),
}


def lookup(error: HJServeError | type[HJServeError]) -> ErrorMapping:
    """Status and error_type of an error (instance or class)."""
    cls = error if isinstance(error, type) else type(error)
    for klass in cls.__mro__:
        mapping = ERROR_TABLE.get(klass)
        if mapping is not None:
            return mapping
    raise TypeError(f"{cls!r} is not an HJServeError")  # pragma: no cover - all subclass the base


def error_body(message: str, error_type: str) -> dict[str, str]:
    """The JSON body of every error response."""
    return {"error": message, "error_type": error_type}
