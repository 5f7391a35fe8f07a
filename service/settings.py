"""Settings: one pydantic-settings class, every field read from ``HJSERVE_<FIELD>``.

The docstring of each field is the configuration reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings"]


def _split_keys(value: object) -> object:
    """Accept a JSON list or a comma-separated string for the key lists."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of one hjserve process (environment prefix ``HJSERVE_``)."""

    model_config = SettingsConfigDict(env_prefix="HJSERVE_", extra="ignore", validate_default=True)

    model_repository: Path = Path("models")
    """Model repository root: ``<root>/<model_name>/<version>/`` with numeric version directories,
    each holding ``model.onnx`` and/or ``model.pt`` + ``model.json``."""

    host: str = "0.0.0.0"
    """Interface the HTTP server binds to."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port of the HTTP server."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run: ``cuda`` when available under ``auto``, else ``cpu``. ``cuda`` fails a model's
    load when no GPU runtime is present."""

    backend: Literal["auto", "onnx", "torch"] = "auto"
    """Backend preference: ``onnx`` (onnxruntime on ``model.onnx``), ``torch`` (``model.pt`` +
    ``model.json``) or ``auto`` (ONNX when the version has ``model.onnx``, else torch)."""

    intra_op_threads: int = Field(0, ge=0)
    """Threads each backend may use inside one operator; 0 lets the library decide."""

    max_batch_size: int = Field(64, ge=1)
    """Largest number of rows the dynamic batcher sends to a backend at once (advertised in the model
    config). Larger requests are split into chunks of this size."""

    max_queue_delay_ms: float = Field(0.0, ge=0.0)
    """How long the dynamic batcher waits for more rows after the first request of a batch. 0 (Triton's
    default) runs at once; batches still form from the requests that queue while a batch computes."""

    max_queue_size: int = Field(256, ge=1)
    """Requests (or request chunks) that may wait per model version; beyond it requests are rejected
    at once with 503 and ``Retry-After``."""

    request_timeout_s: float = Field(30.0, gt=0.0)
    """Longest time a request may wait for its result (queue + compute) before it fails with 504."""

    retry_after_s: int = Field(1, ge=0)
    """Value of the ``Retry-After`` header on 503 overload responses, in seconds."""

    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    """Largest request body accepted (413 beyond it). Streamed batch-attribution bodies (NDJSON and
    binary) are not held in memory and are limited by ``batch_max_rows`` instead."""

    batch_max_rows: int = Field(10_000_000, ge=1)
    """Largest number of rows one batch-attribution job may send."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Keys accepted on inference and model routes (``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``); JSON list or comma-separated. Empty: no authentication."""

    admin_key: SecretStr | None = None
    """Key required by the model repository extension (index, load, unload); unset: open."""

    default_top_k: int = Field(5, ge=1)
    """Top-k of the ``attribution_*`` / ``label_sensitivity`` outputs when a request gives none
    (capped by the model's ``top_k_max``)."""

    default_tau: float = Field(0.1, gt=0.0)
    """Tolerance of the regression certificate when a request gives no ``tau`` parameter."""

    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    """Log level of the service and of uvicorn."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        return _split_keys(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
