"""Batch attribution on a distributed engine, with the one :class:`~hjmodel.predictor.Predictor`.

Ray Data (``pip install 'hjserve[ray]'``)::

    import ray, hjmodel.distributed as hd
    ds = ray.data.read_parquet("s3://bucket/rows/")            # a column "input" (or feature columns)
    out = hd.attribute_dataset(ds, "models/digits_lse/1", outputs="all", top_k=3, concurrency=8)
    out.write_parquet("s3://bucket/attributions/")

Each of ``concurrency`` actors builds one Predictor and opens one runtime session (one thread) on
its worker; batches stream through them.

Spark (``mapInPandas``; each executor opens its own session)::

    fn = hd.spark_map_in_pandas("models/digits_lse/1", outputs=["prediction", "certified_radius"])
    result = df.mapInPandas(fn, schema=hd.spark_schema("models/digits_lse/1", ["prediction", "certified_radius"],
                                                       passthrough="id long"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .predictor import Predictor, requested_outputs
from .serving import outputs_for

__all__ = ["attribute_dataset", "spark_map_in_pandas", "spark_schema"]

_SPARK_TYPES = {"FP32": "float", "INT64": "long", "BOOL": "boolean"}


def attribute_dataset(ds, artifact: str | Path, *, outputs: Sequence[str] | str | None = None, top_k: int = 5,
                      tau: float | None = None, batch_size: int = 1024, concurrency: int = 1, num_cpus: float = 1,
                      input_column: str = "input", feature_columns: Sequence[str] | None = None, **map_options: Any):
    """``ds.map_batches`` with one :class:`Predictor` per actor: a Ray Dataset of the diagnostic
    columns (plus the dataset's non-feature columns, passed through), lazily, like any Ray transform."""
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:   # pragma: no cover - the extra is installed in CI
        raise ImportError("Ray Data is an optional extra: pip install 'hjserve[ray]'") from exc
    options = {"artifact": str(artifact), "outputs": outputs, "top_k": top_k, "tau": tau, "threads": 1,
               "input_column": input_column, "feature_columns": feature_columns}
    Predictor(**options)   # its checks here, where the caller sees them, not in every actor
    return ds.map_batches(Predictor, fn_constructor_kwargs=options, batch_size=batch_size, batch_format="numpy",
                          concurrency=concurrency, num_cpus=num_cpus, **map_options)


class _MapInPandas:
    """Picklable (by pickle and cloudpickle alike): the predictor travels without its session."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def __call__(self, frames: Iterator) -> Iterator:
        for frame in frames:
            yield self.predictor(frame)


def spark_map_in_pandas(artifact: str | Path, **predictor_options: Any) -> Callable[[Iterator], Iterator]:
    """The function for Spark's ``DataFrame.mapInPandas``: an iterator of pandas DataFrames in, their
    diagnostics out (one Predictor per task, its session opened on the executor at first use)."""
    return _MapInPandas(Predictor(artifact, **predictor_options))


def spark_schema(artifact: str | Path, outputs: Sequence[str] | str | None = None, passthrough: str = "") -> str:
    """The DDL schema string of :func:`spark_map_in_pandas`'s output: ``passthrough`` columns first,
    then each output (arrays for per-row vectors), then ``class`` for classification. ``outputs``:
    as the Predictor's (:func:`~hjmodel.predictor.requested_outputs`)."""
    from .artifact import read_artifact_spec

    spec = read_artifact_spec(artifact)
    kinds = {o.name: o for o in outputs_for(spec.task)}
    fields = [passthrough] if passthrough else []
    for name in requested_outputs(spec.task, outputs):
        o = kinds[name]
        base = _SPARK_TYPES[o.datatype]
        fields.append(f"{name} array<{base}>" if o.row_shape else f"{name} {base}")
    if spec.task == "classification":
        fields.append("class string")
    return ", ".join(fields)
