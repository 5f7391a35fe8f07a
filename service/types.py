"""Wire types of the Open Inference Protocol (pydantic) and the decoded request/response the
dataplane works on (plain dataclasses holding numpy arrays)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

__all__ = [
    "ConfigTensor",
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
    "ModelConfigResponse",
    "ModelIndexEntry",
    "ModelIndexResponse",
    "ModelReadyResponse",
    "ModelStatistics",
    "ModelStatsResponse",
    "RepositoryIndexItem",
    "RepositoryIndexRequest",
    "RepositoryModelRequest",
    "RequestInput",
    "RequestOutput",
    "RequestedOutput",
    "ResponseOutput",
    "RowBlock",
    "V1Request",
    "V1Response",
]

Parameters = dict[str, Any]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class _Request(BaseModel):
    """A body a client sends: a field nothing reads is refused, never dropped (a misspelt
    ``parameters`` would otherwise be served with the defaults). The protocol's extension point is
    ``parameters``, which the dataplane checks name by name."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RequestInput(_Request):
    """One input tensor of a V2 inference request (JSON ``data`` or binary ``binary_data_size``)."""

    name: str
    shape: list[StrictInt]   # not true, 1.0 or "1" read as 1
    datatype: str
    parameters: Parameters | None = None
    data: Any = None


class RequestOutput(_Request):
    """One requested output (``parameters.binary_data`` asks for it in binary)."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Request):
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


class RepositoryIndexRequest(_Request):
    """``POST /v2/repository/index`` body: ``ready`` lists only ready models."""

    ready: StrictBool | None = None   # not "yes" or 1 read as true


class RepositoryModelRequest(_Request):
    """``POST /v2/repository/models/{name}/load`` and ``.../unload`` body (optional). A model loads
    from its repository folder as it is: Triton's load parameters (``config``, ``file:...``
    overrides) are refused, never ignored; unload takes ``unload_dependents`` (hjserve has no
    ensembles, so it changes nothing)."""

    parameters: dict[str, Any] | None = None


class RepositoryIndexItem(_Wire):
    """One model version in the repository index, with the reason when it is not ready."""

    name: str
    version: str | None = None
    state: str
    reason: str = ""


class ModelReadyResponse(_Wire):
    """``GET /v2/models/{m}[/versions/{v}]/ready``."""

    name: str
    ready: bool


class ModelIndexEntry(_Wire):
    """A model with at least one ready version, and those versions."""

    name: str
    versions: list[str]


class ModelIndexResponse(_Wire):
    """``GET /v2/models``."""

    models: list[ModelIndexEntry]


class ConfigTensor(_Wire):
    """An input or output of a Triton model configuration (``reshape`` only for per-row scalars)."""

    name: str
    data_type: str
    dims: list[int]
    reshape: dict[str, list[int]] | None = None
    optional: bool | None = None


class ModelConfigResponse(_Wire):
    """Triton's model configuration (the JSON form of its ``ModelConfig`` protobuf message)."""

    name: str
    platform: str
    backend: str
    version_policy: dict[str, dict[str, Any]]
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    dynamic_batching: dict[str, Any]
    instance_group: list[dict[str, Any]]
    parameters: dict[str, dict[str, str]]


class ModelStatistics(_Wire):
    """Triton's statistics of one model version (counts and cumulative nanoseconds)."""

    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: dict[str, dict[str, int]]
    batch_stats: list[dict[str, Any]]


class ModelStatsResponse(_Wire):
    """``GET /v2/models[/{m}[/versions/{v}]]/stats``."""

    model_stats: list[ModelStatistics]


class V1Response(_Wire):
    """``:predict`` / ``:explain``: readable predictions, each number with its meaning."""

    model_name: str
    model_version: str
    predictions: list[Any]
    diagnostics: list[dict[str, Any]]
    explanations: list[dict[str, Any]] | None = None


class V1Request(_Request):
    """``POST /v1/models/{m}:predict`` / ``:explain`` body: rows of features."""

    instances: list[list[StrictFloat]]   # JSON numbers: not "1" or true read as 1.0
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
class RowBlock:
    """A block of answered rows of a batch attribution job: rows ``start .. start + rows - 1``, the
    selected outputs and, for classification, each row's class name."""

    start: int
    rows: int
    outputs: list[InferOutput]
    classes: list[str] | None = None


@dataclass
class InferResponse:
    """The dataplane's answer to an :class:`InferRequest`."""

    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)
