"""Repository extension: load / unload, reload under traffic with zero failures, failed reloads
keep the previous version serving."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
from svc_helpers import copy_version, run_server
from tiny_model import D

BODY = {"inputs": [{"name": "input", "shape": [2, D], "datatype": "FP32", "data": np.ones(2 * D).tolist()}]}


def test_reload_under_traffic_has_zero_failures(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    copy_version(tiny_repo / "clf" / "1", repo / "clf" / "1")
    stop = threading.Event()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client_loop(url):
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v2/models/clf/infer", json=BODY)
                with lock:
                    results.append((r.status_code, r.json().get("model_version", r.text)))

    with run_server(repo, tmp_path, max_queue_delay_ms=1, model_control_mode="explicit") as s, s.client() as admin:
        threads = [threading.Thread(target=client_loop, args=(s.url,)) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        copy_version(tiny_repo / "clf" / "2", repo / "clf" / "2")
        assert admin.post("/v2/repository/models/clf/load").status_code == 200
        time.sleep(0.3)
        assert admin.post("/v2/repository/models/clf/load").status_code == 200  # reload the same versions
        time.sleep(0.3)
        # a corrupt new version: the load fails, versions 1 and 2 keep serving
        (repo / "clf" / "3").mkdir()
        (repo / "clf" / "3" / "model.onnx").write_bytes(b"\x00garbage")
        r = admin.post("/v2/repository/models/clf/load")
        assert r.status_code == 400 and r.json()["error_type"] == "model_load_failed"
        time.sleep(0.3)
        # corrupt version 2 in place: its reload fails, the previous load of version 2 keeps serving
        (repo / "clf" / "2" / "model.onnx").write_bytes(b"\x00garbage")
        assert admin.post("/v2/repository/models/clf/load").status_code == 400
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        index = admin.post("/v2/repository/index").json()

    statuses = {code for code, _ in results}
    assert statuses == {200}, [r for r in results if r[0] != 200][:5]
    versions = [v for _, v in results]
    assert "1" in versions and "2" in versions and versions[-1] == "2"
    states = {(i["name"], i.get("version")): i for i in index}
    assert states[("clf", "3")]["state"] == "UNAVAILABLE" and states[("clf", "3")]["reason"]
    assert states[("clf", "2")]["state"] == "READY" and "previous load still serving" in states[("clf", "2")]["reason"]


def test_unload_and_load(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    copy_version(tiny_repo / "reg" / "1", repo / "reg" / "1")
    with run_server(repo, tmp_path, model_control_mode="explicit") as s, s.client() as c:
        assert c.get("/v2/models/reg/ready").status_code == 200
        assert c.post("/v2/repository/models/reg/unload").status_code == 200
        r = c.post("/v2/models/reg/infer", json=BODY)
        assert r.status_code == 503 and r.json()["error_type"] == "model_not_ready"
        assert c.post("/v2/repository/index", json={"ready": True}).json() == []
        assert c.get("/v2/health/ready").status_code == 503
        assert c.post("/v2/repository/models/reg/load").status_code == 200
        assert c.post("/v2/models/reg/infer", json=BODY).status_code == 200
        assert "hjserve_model_ready{model=\"reg\",version=\"1\"} 1.0" in c.get("/metrics").text


def test_poll_mode_serves_a_new_version_folder_without_a_load_call(tiny_repo, tmp_path):
    """Triton's poll model control on a real server: publishing a version folder is enough; removing
    one stops serving it; explicit load calls are refused."""
    repo = tmp_path / "repo"
    copy_version(tiny_repo / "clf" / "1", repo / "clf" / "1")
    with run_server(repo, tmp_path, model_control_mode="poll", repository_poll_s=0.2) as s, s.client() as c:
        assert c.get("/v2/models/clf").json()["versions"] == ["1"]
        copy_version(tiny_repo / "clf" / "2", repo / "clf" / "2")
        copy_version(tiny_repo / "reg" / "1", repo / "reg" / "1")
        deadline = time.monotonic() + 20
        while c.get("/v2/models/reg/ready").status_code != 200 or c.get("/v2/models/clf").json()["versions"] != ["1", "2"]:
            assert time.monotonic() < deadline, c.post("/v2/repository/index").json()
            time.sleep(0.1)
        assert c.post("/v2/models/clf/infer", json=BODY).json()["model_version"] == "2"
        import shutil

        shutil.rmtree(repo / "clf" / "2")
        while c.get("/v2/models/clf").json()["versions"] != ["1"]:
            assert time.monotonic() < deadline + 20
            time.sleep(0.1)
        assert c.post("/v2/models/clf/infer", json=BODY).json()["model_version"] == "1"
        r = c.post("/v2/repository/models/clf/load")
        assert r.status_code == 400 and "poll" in r.json()["error"]
