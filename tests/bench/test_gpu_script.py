"""``eval/gpu.py``, the GPU checks: run here with the CPU in the GPU's place, so the script a GPU lease
runs once is known to work before the lease starts, and its comparison is known to fail when it should."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from eval.gpu import compare

ROOT = Path(__file__).resolve().parents[2]


def test_compare_fails_on_what_parity_must_not_allow():
    rng = np.random.default_rng(0)
    radius = rng.uniform(0.1, 2.0, 100).astype(np.float32)
    classes = rng.integers(0, 10, 100)
    want = {"certified_radius": radius, "prediction": classes}
    assert compare({"certified_radius": radius * (1 + 1e-6), "prediction": classes}, want)[0]
    assert not compare({"certified_radius": radius + 1e-3, "prediction": classes}, want)[0]
    one = classes.copy()
    one[0] = (one[0] + 1) % 10                       # a tie within rounding: 1% of rows may differ
    assert compare({"certified_radius": radius, "prediction": one}, want)[0]
    three = classes.copy()
    three[:3] = (three[:3] + 1) % 10
    assert not compare({"certified_radius": radius, "prediction": three}, want)[0]
    ok, detail = compare({"certified_radius": radius[:50], "prediction": classes}, want)
    assert not ok and "shape" in detail
    nan = radius.copy()
    nan[5] = np.nan
    assert compare({"certified_radius": nan, "prediction": classes}, {**want, "certified_radius": nan})[0]
    assert not compare({"certified_radius": radius, "prediction": classes}, {**want, "certified_radius": nan})[0]


def test_compare_holds_the_ood_gate_to_the_same_rank_where_the_decision_agrees():
    """A p-value one calibration rank apart (1/360: within float tolerance of nothing, but a tie counted
    one way on one device and the other way on the other) fails the comparison; on a row whose decision
    differs (a tie within rounding, which is scored against another class) it may differ."""
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 10, 100)
    p = ((1 + rng.integers(0, 360, 100)) / 361).astype(np.float32)
    want = {"prediction": classes, "ood_p_value": p, "ood_flag": p <= 0.05}
    assert compare(dict(want), want)[0]
    rank = p.copy()
    rank[7] += np.float32(1 / 361)
    ok, detail = compare({**want, "ood_p_value": rank}, want)
    assert not ok and "ood_p_value 1 rows differ" in detail, detail
    flipped = classes.copy()
    flipped[7] = (flipped[7] + 1) % 10
    assert compare({"prediction": flipped, "ood_p_value": rank, "ood_flag": want["ood_flag"]}, want)[0]
    regression = {"prediction": rng.normal(size=(100, 1)), "ood_p_value": p}
    assert not compare({**regression, "ood_p_value": rank}, regression)[0]   # no decision: every row


def test_the_gpu_script_runs_with_the_cpu_in_the_gpus_place(demo_repository, tmp_path):
    out = tmp_path / "RESULTS_gpu.md"
    run = subprocess.run([sys.executable, "-m", "eval.gpu", "--device", "cpu", "--parts", "environment,parity",
                          "--models", str(demo_repository), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and ("PASS" in line or "FAIL" in line
                                                                            or "ERROR" in line)]
    models = sorted(p.parent.name for p in demo_repository.glob("*/1"))
    # every bundled model, both backends, the served and the explanation outputs
    assert len(rows) == 4 * len(models) and all("| PASS |" in line for line in rows), rows
    assert "No GPU: the CPU stands in for it" in text


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "RESULTS_gpu.md"
    run = subprocess.run([sys.executable, "-m", "eval.gpu", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "no GPU present" in run.stdout, run.stdout + run.stderr
    assert not out.exists()


def test_served_bits_counts_a_radius_above_float64_only_when_the_re_proof_fails(demo_repository):
    """eval.served_bits.check on digits_deep with the served radius moved up: to one float32 step above
    the float64 model's own (at most 1.2e-7 relative; onnxruntime's lay up to 2.1e-8 above torch's on
    the GPU machine, before the input-rounding allowance took them below) every row
    is re-proven and none counts as rounded up; by 5% (past the linearised bound's root) rows count.
    The served graph is the real onnxruntime backend; only its radius is moved."""
    import torch

    from eval.served_bits import check, server
    from hjmodel import functional as F
    from hjmodel import load_dataset, load_model, serving
    from hjmodel.attacks import held_out

    version = demo_repository / "digits_deep" / "1"
    model = load_model(version).double().eval()
    data = load_dataset("digits")
    x32 = data.X[held_out(model, data.X)][:16].astype(np.float32)
    served = server(version, "onnx")

    def moved(move):
        def run(q):
            out = dict(served(q))
            out["certified_radius"] = move(q, out["certified_radius"])
            return out
        return run

    def step_above_float64(q, r):   # the served radius lies ~1e-5 below float64's (input rounding)
        r64 = model.evaluate(torch.from_numpy(np.asarray(q)).double())["certified_radius"]
        return np.nextafter(F.float32_down(r64).numpy().astype(np.float32), np.float32(np.inf))

    # on a thread that flushes subnormals, as the service's backend threads and eval.served_bits do
    # (the mode is per thread: the test process's own thread keeps its arithmetic)
    with ThreadPoolExecutor(max_workers=1, initializer=serving.flush_subnormals) as flushing:
        torch.manual_seed(0)
        near = flushing.submit(check, model, moved(step_above_float64), x32).result()
        far = flushing.submit(check, model, moved(lambda q, r: (r.astype(np.float64) * 1.05).astype(np.float32)),
                              x32).result()
    assert near["rounded_up"] == 0 and near["reproven"] == len(x32) and near["excess"] > 0, near
    assert far["rounded_up"] > 0, far



def _scaling(tmp_path, spec: str, *extra: str) -> str:
    """The report of ``eval.gpu``'s scaling part on ``spec`` with the CPU in the GPU's place."""
    out = tmp_path / "RESULTS_gpu.md"
    run = subprocess.run([sys.executable, "-m", "eval.gpu", "--device", "cpu", "--parts", "scaling",
                          "--scaling", spec, *extra, "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return out.read_text()


def test_the_scaling_part_builds_times_and_fits_every_kind(tmp_path):
    text = _scaling(tmp_path, "lse,memory,deep:150,300:6")
    assert "ERROR" not in text and "Skipped" not in text and "Failed" not in text
    table, exponents = text.split("Growth exponents")
    measured = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| ") and "kind" not in line]
    assert sorted((k.strip(), int(n), int(d)) for k, n, d in measured) == sorted(
        (k, n, 6) for k in ("lse", "memory", "deep") for n in (150, 300))
    for line in table.splitlines():
        if line.startswith("| ") and "kind" not in line:   # every time a positive finite number
            cells = [float(c) for c in line.strip("| \n").split("|")[3:]]
            assert all(np.isfinite(c) and c > 0 for c in cells), line
    fitted = [line for line in exponents.splitlines() if line.startswith("| ") and "kind" not in line]
    assert len(fitted) == 3, exponents


def test_the_scaling_part_stops_at_its_budget(tmp_path):
    text = _scaling(tmp_path, "lse:150,300:6", "--budget-s", "1")
    # the part starts inside the budget and its first configuration runs (it takes seconds); the
    # second would start after the budget, so it is named, not measured
    assert "| lse | 150 | 6 |" in text and "| lse | 300 | 6 |" not in text
    assert "Skipped (the run's time budget was spent): lse N=300 d=6." in text


def test_a_scaling_configuration_that_fails_is_reported_and_the_rest_run(tmp_path):
    text = _scaling(tmp_path, "no_such_kind,lse:150:6")
    assert "| lse | 150 | 6 |" in text
    failed = text.split("Failed:")[1]
    assert "| no_such_kind | 150 | 6 |" in failed


def test_a_backend_that_cannot_open_or_run_on_the_device_is_named_and_the_others_measured(monkeypatch):
    """A lease's onnxruntime may lack a working CUDA provider: the torch backend is still measured."""
    import time

    import eval.gpu as gpu

    real = gpu.open_backend

    class FailsToRun:
        def __init__(self, served):
            self.served = served

        def infer(self, x, tau):
            raise RuntimeError("no kernel image is available for execution on the device")

        def close(self):
            self.served.close()

    torch_opened = []

    def open_backend(version, backend, device="cpu"):
        if backend != "torch":
            return real(version, backend, device)
        torch_opened.append(version)
        if len(torch_opened) == 1:   # the first configuration: torch cannot open; the second: it cannot run
            raise RuntimeError("the torch backend opened on cpu, not cuda")
        return FailsToRun(real(version, backend, device))

    monkeypatch.setattr(gpu, "open_backend", open_backend)
    text = gpu.scaling("lse:150,300:6", "cpu", time.monotonic() + 600)
    table, rest = text.split("Growth exponents")
    rows = [line for line in table.splitlines() if line.startswith("| lse |")]
    assert len(rows) == 2
    for line in rows:   # onnx measured, torch n/a in both of its columns
        cells = [c.strip() for c in line.strip("| ").split("|")]
        assert cells[9] != "n/a" and cells[10] == "n/a" and cells[12] != "n/a" and cells[13] == "n/a", line
    assert "| lse | 150 | 6 | torch on cpu: RuntimeError: the torch backend opened on cpu, not cuda |" in rest
    assert "| lse | 300 | 6 | torch on cpu, batch 1: RuntimeError: no kernel image is available" in rest
    assert "| lse | 300 | 6 | torch on cpu, batch 1024: RuntimeError: no kernel image" in rest
    fitted = [line for line in rest.splitlines() if line.startswith("| lse | 6 |")]
    assert len(fitted) == 1 and "n/a" not in fitted[0], fitted   # the faster backend: onnx's times


def test_the_cuda_graph_part_says_it_needs_a_gpu():
    import time

    from eval.gpu import cuda_graphs

    assert "Not applicable: CUDA graphs need a GPU" in cuda_graphs("cpu", time.monotonic() + 60)


def test_the_gpu_row_block_comparison_runs_with_the_cpu_in_the_gpus_place(tmp_path):
    """bench/ab_gpu_blocks.py, tried before a lease: on the CPU both arms take the CPU's blocks, so a
    batch larger than one block runs in the same blocks and answers the same bits."""
    out = tmp_path / "ab_gpu_blocks.md"
    run = subprocess.run([sys.executable, "bench/ab_gpu_blocks.py", "--device", "cpu", "--configs",
                          "deep:150:300", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    row = [line for line in out.read_text().splitlines() if line.startswith("| deep |")]
    assert len(row) == 1, out.read_text()
    cells = [c.strip() for c in row[0].strip("| ").split("|")]
    assert cells[:3] == ["deep", "150", "300"] and cells[3] == cells[4] and int(cells[3]) > 1, cells
    assert cells[-1] == "none" and "the CPU standing in" in out.read_text()


def test_the_trace_searches_ab_runs_as_a_lease_would_run_it(demo_repository, tmp_path):
    """bench/ab_trace_searches.py with --device (cpu here, cuda in a lease): the two recordings answer the
    same bits on every row timed (the script checks), and the one that skips empty searches runs fewer
    aten calls on a row whose searches gather nothing."""
    out = tmp_path / "ab_trace_searches.md"
    run = subprocess.run([sys.executable, "bench/ab_trace_searches.py", "--device", "cpu", "--only", "digits_deep",
                          "--batches", "1", "--repeats", "1", "--models", str(demo_repository), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    row = [line for line in out.read_text().splitlines() if line.startswith("| digits_deep |")]
    assert len(row) == 1, out.read_text()
    cells = [c.strip() for c in row[0].strip("| ").split("|")]
    always, skipped = (int(v) for v in cells[2].split(" -> "))
    assert cells[1] == "1" and skipped < 0.8 * always, cells
