"""Triton's load generator, ``perf_analyzer``, against a real server on a demo model: over REST, gRPC
and a gRPC stream, and over REST and gRPC with mutual TLS. Its gRPC requests carry Triton's ``triton_enable_empty_final_response`` parameter,
which this server once refused as unknown (every gRPC run of perf_analyzer failed). ``make test``
installs it into ``.venv-perf`` (``bench/install_perf_analyzer.sh``: tritonclient 2.51's binary)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from svc_helpers import client_tls, metric_value, run_server

ROOT = Path(__file__).resolve().parents[2]
PERF_VENV = Path(os.environ.get("HJSERVE_TEST_PERF_VENV", ROOT / ".venv-perf"))
pytestmark = pytest.mark.skipif(not (PERF_VENV / "perf-env.sh").is_file() and not os.environ.get("CI"),
                                reason="perf_analyzer not installed (make test installs it into .venv-perf)")


def _perf_analyzer(*args: str) -> str:
    """perf_analyzer's report of a closed loop of 200 requests at concurrency 2 (one measurement of that
    many requests: no stability search, which can give up on a busy machine); fails the test on a
    non-zero exit."""
    command = (f". {PERF_VENV}/perf-env.sh && perf_analyzer -m digits_lse {' '.join(args)} --input-data zero "
               "--concurrency-range 2 --request-count 200")
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"perf_analyzer {' '.join(args)} exited {run.returncode}\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.fixture(scope="module")
def perf_server(demo_repository, tmp_path_factory):
    with run_server(demo_repository, tmp_path_factory.mktemp("perf-logs"), grpc=True) as s:
        yield s


@pytest.mark.parametrize("protocol", ["http", "grpc", "grpc-stream"])
def test_perf_analyzer_drives_the_server(perf_server, protocol):
    url = perf_server.grpc_target if protocol.startswith("grpc") else perf_server.host_port
    args = ["-u", url, "-i", protocol.split("-")[0], *(["--streaming"] if protocol == "grpc-stream" else [])]
    report = _perf_analyzer(*args)
    throughput = float(report.split("Throughput:")[1].split()[0])
    assert throughput > 0, report
    with perf_server.client() as http:
        text = http.get("/metrics").text
    if protocol == "http":
        assert metric_value(text, "hjserve_http_requests_total", route="/v2/models/{model_name}/infer", status="200") > 0
    else:
        method = "ModelStreamInfer" if protocol == "grpc-stream" else "ModelInfer"
        assert metric_value(text, "hjserve_grpc_requests_total", method=method, code="OK") > 0
        assert metric_value(text, "hjserve_grpc_requests_total", method=method, code="INVALID_ARGUMENT") == 0


@pytest.fixture(scope="module")
def mtls_perf_server(demo_repository, pki, tmp_path_factory):
    """The demo models behind mutual TLS (tests/service/test_tls.py's certificates)."""
    with run_server(demo_repository, tmp_path_factory.mktemp("perf-tls-logs"), grpc=True,
                    tls_context=client_tls(pki, "client"),
                    tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                    tls_client_ca_file=pki / "ca.pem") as s:
        yield s


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_drives_the_server_over_mutual_tls(mtls_perf_server, pki, protocol):
    """Triton's load generator with its own TLS options: verifying the server by the test CA, and
    presenting the client certificate the server requires."""
    if protocol == "http":
        args = ["-u", f"https://{mtls_perf_server.host_port}", "-i", "http",
                f"--ssl-https-ca-certificates-file={pki / 'ca.pem'}",
                f"--ssl-https-client-certificate-file={pki / 'client.pem'}",
                f"--ssl-https-private-key-file={pki / 'client.key'}"]
    else:
        args = ["-u", mtls_perf_server.grpc_target, "-i", "grpc", "--ssl-grpc-use-ssl",
                f"--ssl-grpc-root-certifications-file={pki / 'ca.pem'}",
                f"--ssl-grpc-private-key-file={pki / 'client.key'}",
                f"--ssl-grpc-certificate-chain-file={pki / 'client.pem'}"]
    report = _perf_analyzer(*args)
    assert float(report.split("Throughput:")[1].split()[0]) > 0, report
    with mtls_perf_server.client() as http:
        text = http.get("/metrics").text
    if protocol == "http":
        assert metric_value(text, "hjserve_http_requests_total", route="/v2/models/{model_name}/infer", status="200") > 0
    else:
        assert metric_value(text, "hjserve_grpc_requests_total", method="ModelInfer", code="OK") > 0
