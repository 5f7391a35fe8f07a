"""Wire types of the Open Inference Protocol (pydantic) and the decoded request/response the
dataplane works on (plain dataclasses holding numpy arrays)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorResponse",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InferenceRequest",
    "InferenceResponse",
    "MetadataModelResponse",
    "MetadataServerResponse",
    "MetadataTensor",
    "RepositoryIndexItem",
    "RepositoryIndexRequest",
    "RequestInput",
    "RequestOutput",
    "RequestedOutput",
    "ResponseOutput",
    "V1Request",
]

Parameters = dict[str, Any]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class RequestInput(_Wire):
    """One input tensor of a V2 inference request (JSON ``data`` or binary ``binary_data_size``)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: Any = None


class RequestOutput(_Wire):
    """One requested output (``parameters.binary_data`` asks for it in binary)."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Wire):
    """V2 inference request body (the JSON part when the binary extension is used)."""

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Wire):
    """One output tensor of a V2 inference response."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(_Wire):
    """V2 inference response body."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    """The body of every error response (any status >= 400)."""

    error: str
    error_type: str


class MetadataServerResponse(_Wire):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class MetadataTensor(_Wire):
    """A tensor in model metadata; ``-1`` marks the batch dimension."""

    name: str
    datatype: str
    shape: list[int]


class MetadataModelResponse(_Wire):
    """``GET /v2/models/{m}[/versions/{v}]``."""

    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class RepositoryIndexRequest(_Wire):
    """``POST /v2/repository/index`` body: ``ready`` lists only ready models."""

    ready: bool | None = None


class RepositoryIndexItem(_Wire):
    """One model version in the repository index, with the reason when it is not ready."""

    name: str
    version: str | None = None
    state: str
    reason: str = ""


class V1Request(_Wire):
    """``POST /v1/models/{m}:predict`` / ``:explain`` body: rows of features."""

    instances: list[list[float]]
    parameters: Parameters | None = None


# -- decoded form ---------------------------------------------------------------------------------


@dataclass
class InferInput:
    """A decoded input tensor."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass
class RequestedOutput:
    """A requested output; ``binary`` None means "use the request default"."""

    name: str
    binary: bool | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferRequest:
    """A decoded V2 inference request."""

    inputs: list[InferInput]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: Parameters = field(default_factory=dict)
    id: str | None = None
    binary_output: bool = False


@dataclass
class InferOutput:
    """An output tensor ready to encode (``binary``: send it in the binary section)."""

    name: str
    datatype: str
    array: np.ndarray
    binary: bool = False


@dataclass
class InferResponse:
    """The dataplane's answer to an :class:`InferRequest`."""

    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)
