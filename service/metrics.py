"""Prometheus metrics (module constants; labels ``model`` and ``version``).

The deploy dashboards and alert rules rely on these exact names. OOD, hallucination, radius,
energy-gap and OOD-score metrics are recorded for every predicted row, whether or not the client
asked for those outputs (the graph computes them anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from hjmodel import serving
from service.stats import InferenceStats

__all__ = [
    "BATCH_JOBS_IN_PROGRESS",
    "BATCH_ROWS",
    "BATCH_SIZE",
    "CERTIFIED_RADIUS",
    "CLASS_PREDICTIONS",
    "CONTENT_TYPE_LATEST",
    "ENERGY_GAP",
    "GRPC_REQUESTS",
    "HALLUCINATION_FLAGS",
    "HTTP_REQUESTS",
    "INFERENCE_FAILURES",
    "INFERENCE_REQUESTS",
    "MODEL_READY",
    "OOD_COMPONENTS",
    "OOD_FLAGS",
    "OOD_SCORE",
    "PREDICTIONS",
    "QUEUE_SIZE",
    "REQUEST_DURATION",
    "TLS_CERTIFICATE_EXPIRY",
    "VersionMetrics",
    "render",
]

disable_created_metrics()  # no *_created series: they double the exposition for nothing

_MV = ("model", "version")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0)
_RADIUS_BUCKETS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
                   30.0, 100.0)
_GAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, 1000.0)
_OOD_BUCKETS = (-10.0, -5.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0,
                100.0, 1000.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

INFERENCE_REQUESTS = Counter("hjserve_inference_requests", "Inference requests by outcome (success|failure).",
                             (*_MV, "outcome"))
INFERENCE_FAILURES = Counter("hjserve_inference_failures", "Failed inference requests by reason (error_type).",
                             (*_MV, "reason"))
PREDICTIONS = Counter("hjserve_predictions", "Rows predicted.", _MV)
REQUEST_DURATION = Histogram(
    "hjserve_request_duration_seconds",
    "Inference latency per phase: queue (waiting for a batch), compute (the batch's backend run), "
    "diagnostics (output selection, slicing and diagnostic metrics), total (the whole request).",
    (*_MV, "phase"), buckets=_LATENCY_BUCKETS)
QUEUE_SIZE = Gauge("hjserve_queue_size", "Requests waiting in the dynamic batcher's queue.", _MV)
BATCH_SIZE = Histogram("hjserve_batch_size", "Rows per backend run.", _MV, buckets=_BATCH_BUCKETS)
OOD_FLAGS = Counter("hjserve_ood_flags", "Rows flagged out-of-distribution, by the component that fired.",
                    (*_MV, "component"))
HALLUCINATION_FLAGS = Counter("hjserve_hallucination_flags",
                              "Rows flagged as hallucinations (unsupported and in the extrapolation regime).", _MV)
CERTIFIED_RADIUS = Histogram("hjserve_certified_radius", "Certified L2 radius per predicted row whose request asked for it (setting monitored_outputs).", _MV,
                             buckets=_RADIUS_BUCKETS)
ENERGY_GAP = Histogram("hjserve_energy_gap", "Energy gap Delta/eps per predicted row.", _MV, buckets=_GAP_BUCKETS)
OOD_SCORE = Histogram("hjserve_ood_score", "OOD score (Hopf-Cole value u, diffusion units) per predicted row.",
                      _MV, buckets=_OOD_BUCKETS)
CLASS_PREDICTIONS = Counter("hjserve_class_predictions", "Predicted rows per class name.", (*_MV, "class"))
BATCH_ROWS = Counter("hjserve_batch_rows", "Rows processed by batch attribution jobs.", _MV)
BATCH_JOBS_IN_PROGRESS = Gauge("hjserve_batch_jobs_in_progress", "Batch attribution jobs running.", _MV)
BATCH_SPOOL_BYTES = Gauge("hjserve_batch_spool_bytes",
                          "Bytes the batch-attribution bodies being received and answered hold now, in memory "
                          "and spool files (limit: HJSERVE_MAX_SPOOL_BYTES).")
REQUEST_MEMORY_BYTES = Gauge("hjserve_request_memory_bytes",
                             "Memory the inference bodies being read and decoded take now, as estimated "
                             "before parsing, with the answers not yet sent and the room reserved for gRPC "
                             "messages being received or awaited (an open stream holds room for its next "
                             "one) (limit: HJSERVE_MAX_REQUEST_MEMORY_BYTES).")
MODEL_READY = Gauge("hjserve_model_ready", "1 when the model version is loaded and serving, else 0.", _MV)
HTTP_REQUESTS = Counter("hjserve_http_requests", "HTTP requests by route template, method and status.",
                        ("route", "method", "status"))
GRPC_REQUESTS = Counter("hjserve_grpc_requests", "gRPC calls by method and status code.", ("method", "code"))
#: Only with TLS: a labelled gauge exports nothing until its child exists, so a plaintext server
#: has no series for the expiry alert to read as the year 1970.
TLS_CERTIFICATE_EXPIRY = Gauge("hjserve_tls_certificate_expiry_timestamp_seconds",
                               "When the served TLS certificate chain's earliest certificate expires (UNIX "
                               "seconds); updated when a renewed certificate is loaded.", ("certificate",))

#: ``ood_component`` output value -> label of ``hjserve_ood_flags_total``.
OOD_COMPONENTS = serving.OOD_COMPONENTS


def _observe(hist, values: np.ndarray) -> None:
    """Every finite value of ``values`` into the histogram ``hist``, as one ``observe`` per value would
    record it: each value counted in the first bucket whose upper bound it does not exceed, and added
    to the sum. A block of rows (a batch job's chunk, a dynamic batch) is counted per bucket with
    numpy and written with one increment per bucket hit and one to the sum: one ``observe`` per row
    took a lock and a Python loop over the buckets each time, ~2.6 ms of the event loop for the three
    histograms of a 1,024-row batch-job chunk, against ~0.1 ms now (``bench/results/loop_work.md``,
    side by side). This reads the
    histogram's own bucket and sum values (prometheus_client's ``Histogram._buckets`` / ``_sum`` /
    ``_upper_bounds``); a histogram without them is observed value by value. Test: the exposition
    equals per-value ``observe``'s (tests/service/test_metrics.py)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    buckets, total = getattr(hist, "_buckets", None), getattr(hist, "_sum", None)
    bounds = getattr(hist, "_upper_bounds", None)
    if v.size <= 1 or buckets is None or total is None or bounds is None or len(bounds) != len(buckets):
        for x in v.tolist():
            hist.observe(x)
        return
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), v, side="left"),
                         minlength=len(bounds))                  # first bound >= v: v <= bound
    total.inc(float(v.sum()))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))


class VersionMetrics:
    """The labelled children of one model version (resolved once, used on every request)."""

    def __init__(self, model: str, version: str, class_names: Sequence[str] = ()):
        self.labels = (model, version)
        mv = {"model": model, "version": version}
        self.success = INFERENCE_REQUESTS.labels(**mv, outcome="success")
        self.failure = INFERENCE_REQUESTS.labels(**mv, outcome="failure")
        self.predictions = PREDICTIONS.labels(**mv)
        self.phase = {p: REQUEST_DURATION.labels(**mv, phase=p) for p in ("queue", "compute", "diagnostics", "total")}
        self.queue_size = QUEUE_SIZE.labels(**mv)
        self.batch_size = BATCH_SIZE.labels(**mv)
        self.ood = [OOD_FLAGS.labels(**mv, component=c) for c in OOD_COMPONENTS]
        self.hallucination = HALLUCINATION_FLAGS.labels(**mv)
        self.radius = CERTIFIED_RADIUS.labels(**mv)
        self.gap = ENERGY_GAP.labels(**mv)
        self.ood_score = OOD_SCORE.labels(**mv)
        self.classes = [CLASS_PREDICTIONS.labels(**mv, **{"class": str(c)}) for c in class_names]
        self.batch_rows = BATCH_ROWS.labels(**mv)
        self.batch_jobs = BATCH_JOBS_IN_PROGRESS.labels(**mv)
        self.ready = MODEL_READY.labels(**mv)
        self.stats = InferenceStats()
        self._reasons: dict[str, Counter] = {}

    def failed(self, reason: str, total_s: float = 0.0) -> None:
        """Count a failed request with its error_type."""
        self.failure.inc()
        child = self._reasons.get(reason)
        if child is None:
            child = self._reasons[reason] = INFERENCE_FAILURES.labels(*self.labels, reason)
        child.inc()
        self.stats.fail(total_s)

    def succeeded(self, total_s: float, queue_s: float, compute_s: float, rows: int) -> None:
        """Count a successful request of ``rows`` rows and its phase durations."""
        self.success.inc()
        self.phase["queue"].observe(queue_s)
        self.phase["compute"].observe(compute_s)
        self.phase["total"].observe(total_s)
        self.stats.success(total_s, queue_s, compute_s, rows)

    def on_batch(self, rows: int, compute_s: float) -> None:
        """A backend run of ``rows`` rows finished."""
        self.batch_size.observe(rows)
        self.stats.batch(rows, compute_s)

    def record_rows(self, outputs: dict[str, np.ndarray], task: str) -> None:
        """Diagnostic metrics of every predicted row (all graph outputs, before any selection)."""
        n = len(next(iter(outputs.values()))) if outputs else 0
        self.predictions.inc(n)
        flag = outputs.get("ood_flag")
        if flag is not None:
            flagged = np.asarray(flag, dtype=bool).ravel()
            if flagged.any():   # most traffic flags nothing: one check, not one count per component
                component = outputs.get("ood_component")
                comp = [0] * int(flagged.sum()) if component is None else np.asarray(component).ravel()[flagged].tolist()
                for i, counter in enumerate(self.ood):
                    count = comp.count(i)
                    if count:
                        counter.inc(count)
        hall = outputs.get("hallucination_flag")
        if hall is not None:
            count = int(np.count_nonzero(hall))
            if count:
                self.hallucination.inc(count)
        for key, hist in (("certified_radius", self.radius), ("energy_gap", self.gap),
                          ("ood_score", self.ood_score)):
            if key in outputs:
                _observe(hist, outputs[key])
        if task == "classification" and self.classes and "prediction" in outputs:
            k = len(self.classes)
            pred = np.asarray(outputs["prediction"]).ravel()
            counts = np.bincount(pred[(pred >= 0) & (pred < k)].astype(np.int64), minlength=k)
            for c in np.flatnonzero(counts).tolist():
                self.classes[c].inc(int(counts[c]))


def render() -> tuple[bytes, str]:
    """The Prometheus exposition of the default registry and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
