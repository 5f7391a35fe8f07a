"""Core errors (no HTTP here) and the one table that maps each to a status and an ``error_type``.

Every error body the service sends is ``{"error": "<message>", "error_type": "<type>"}``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BackendError",
    "BadRequest",
    "BodyTimeout",
    "ERROR_TABLE",
    "EmptyBatch",
    "ErrorMapping",
    "Forbidden",
    "HJServeError",
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
    "RequestTimeout",
    "Unauthorized",
    "UnknownInput",
    "UnknownOutput",
    "ValidationFailed",
    "error_body",
    "lookup",
]


class HJServeError(Exception):
    """Base of every error the service reports to a client."""

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


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


class Overloaded(HJServeError):
    """The model's queue is full; retry later (sent with ``Retry-After``)."""


class RequestTimeout(HJServeError):
    """The request did not get its result within the request timeout."""


class BackendError(HJServeError):
    """The backend failed while running the model on valid input."""


class InternalError(HJServeError):
    """An unexpected failure inside the service."""


@dataclass(frozen=True)
class ErrorMapping:
    """HTTP status and machine-readable ``error_type`` of one error class."""

    status: int
    error_type: str


#: The one place that maps errors to HTTP statuses. Ordered most specific first; ``lookup`` walks
#: the class's MRO, so a subclass without an entry inherits its parent's.
ERROR_TABLE: dict[type[HJServeError], ErrorMapping] = {
    InvalidJSON: ErrorMapping(400, "invalid_json"),
    InvalidHeader: ErrorMapping(400, "invalid_header"),
    InvalidShape: ErrorMapping(400, "invalid_shape"),
    InvalidDatatype: ErrorMapping(400, "invalid_datatype"),
    InvalidValue: ErrorMapping(400, "invalid_value"),
    EmptyBatch: ErrorMapping(400, "empty_batch"),
    InvalidParameter: ErrorMapping(400, "invalid_parameter"),
    UnknownInput: ErrorMapping(400, "unknown_input"),
    UnknownOutput: ErrorMapping(400, "unknown_output"),
    InvalidModelName: ErrorMapping(400, "invalid_model_name"),
    ValidationFailed: ErrorMapping(400, "validation_error"),
    BadRequest: ErrorMapping(400, "bad_request"),
    Unauthorized: ErrorMapping(401, "unauthorized"),
    Forbidden: ErrorMapping(403, "forbidden"),
    NotFound: ErrorMapping(404, "not_found"),
    ModelNotFound: ErrorMapping(404, "model_not_found"),
    MethodNotAllowed: ErrorMapping(405, "method_not_allowed"),
    BodyTimeout: ErrorMapping(408, "body_timeout"),
    PayloadTooLarge: ErrorMapping(413, "payload_too_large"),
    ModelLoadFailed: ErrorMapping(400, "model_load_failed"),
    ModelNotReady: ErrorMapping(503, "model_not_ready"),
    Overloaded: ErrorMapping(503, "overloaded"),
    RequestTimeout: ErrorMapping(504, "timeout"),
    BackendError: ErrorMapping(500, "backend_error"),
    InternalError: ErrorMapping(500, "internal_error"),
    HJServeError: ErrorMapping(500, "internal_error"),
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
