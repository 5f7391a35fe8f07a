"""TLS on both transports, end to end: a real server process with certificates made here (the
openssl command), Triton's real clients (tritonclient.http and .grpc), httpx and raw gRPC channels,
with and without client certificates (mutual TLS).

On 528016c the server had no TLS at all: an API key crossed the network in clear text on both
transports, and ``HJSERVE_TLS_*`` stopped the start as variables that name no setting."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from svc_helpers import client_tls, metric_value, run_server
from tiny_model import D
from tritonclient.utils import InferenceServerException

from service import tls
from service.grpc import inference_pb2 as pb
from service.settings import Settings

KEY = "k-31f9-tls"
OUTPUTS = ("prediction", "probabilities", "certified_radius")


def _x() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(3, D)).astype(np.float32)


def _triton_http(server, pki: Path, client: str | None = None) -> dict[str, np.ndarray]:
    """Triton's HTTP client over TLS (trusting ``ca``; ``client``'s certificate when given)."""
    options = {"ca_certs": str(pki / "ca.pem")}
    if client:
        options.update(certfile=str(pki / f"{client}.pem"), keyfile=str(pki / f"{client}.key"))
    c = th.InferenceServerClient(server.host_port, ssl=True, ssl_options=options, network_timeout=30.0)
    try:
        inp = th.InferInput("input", [3, D], "FP32")
        inp.set_data_from_numpy(_x())
        result = c.infer("clf", [inp], outputs=[th.InferRequestedOutput(o) for o in OUTPUTS],
                         headers={"Authorization": f"Bearer {KEY}"})
        return {o: result.as_numpy(o) for o in OUTPUTS}
    finally:
        c.close()


def _triton_grpc(server, pki: Path, client: str | None = None) -> dict[str, np.ndarray]:
    """Triton's gRPC client over TLS (trusting ``ca``; ``client``'s certificate when given)."""
    keys = {"private_key": str(pki / f"{client}.key"), "certificate_chain": str(pki / f"{client}.pem")} \
        if client else {}
    c = tg.InferenceServerClient(server.grpc_target, ssl=True, root_certificates=str(pki / "ca.pem"), **keys)
    try:
        inp = tg.InferInput("input", [3, D], "FP32")
        inp.set_data_from_numpy(_x())
        result = c.infer("clf", [inp], outputs=[tg.InferRequestedOutput(o) for o in OUTPUTS],
                         headers={"authorization": f"Bearer {KEY}"}, client_timeout=30)
        return {o: result.as_numpy(o) for o in OUTPUTS}
    finally:
        c.close()


def _grpc_live(target: str, credentials: grpc.ChannelCredentials | None) -> bool:
    """ServerLive over a raw channel: TLS with ``credentials``, plaintext without."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=pb.ServerLiveRequest.SerializeToString,
                                   response_deserializer=pb.ServerLiveResponse.FromString)
        return live(pb.ServerLiveRequest(), timeout=10).live


def _grpc_credentials(pki: Path, client: str | None = None) -> grpc.ChannelCredentials:
    read = lambda name: (pki / name).read_bytes()   # noqa: E731
    return grpc.ssl_channel_credentials(read("ca.pem"), *((read(f"{client}.key"), read(f"{client}.pem"))
                                                          if client else ()))


@pytest.fixture(scope="module")
def tls_server(tiny_repo, pki, tmp_path_factory):
    with run_server(tiny_repo, tmp_path_factory.mktemp("tls_logs"), grpc=True, tls_context=client_tls(pki),
                    tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key", api_keys=KEY,
                    header_timeout_s=1.5, body_timeout_s=1.5, max_header_bytes=16 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(tiny_repo, pki, tmp_path_factory):
    """Mutual TLS: a client must present a certificate that ``ca`` signed."""
    with run_server(tiny_repo, tmp_path_factory.mktemp("mtls_logs"), grpc=True,
                    tls_context=client_tls(pki, "client"), tls_cert_file=pki / "server.pem",
                    tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.pem", api_keys=KEY) as s:
        yield s


def test_both_transports_answer_over_tls_with_the_same_bits(tls_server, pki):
    assert tls_server.url.startswith("https://")
    with tls_server.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2/models/clf").json()["name"] == "clf"
        assert c.get("/v2/models/clf", headers={"Authorization": "Bearer wrong"}).status_code == 401
    rest, rpc = _triton_http(tls_server, pki), _triton_grpc(tls_server, pki)
    for name in OUTPUTS:
        np.testing.assert_array_equal(rest[name], rpc[name], err_msg=name)
    assert _grpc_live(tls_server.grpc_target, _grpc_credentials(pki))


def test_a_plaintext_client_is_not_answered_and_the_server_goes_on(tls_server, pki):
    """Plaintext HTTP and gRPC to the TLS ports get no answer (never a reply in clear text); the
    server then serves TLS clients as before."""
    with pytest.raises(httpx.TransportError):
        httpx.get(tls_server.url.replace("https://", "http://") + "/v2/health/live", timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        _grpc_live(tls_server.grpc_target, None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.ConnectError):   # a client that trusts another CA refuses this server
        httpx.get(tls_server.url + "/v2/health/live", verify=client_tls(pki, ca="rogue"), timeout=10)
    assert _grpc_live(tls_server.grpc_target, _grpc_credentials(pki))
    with tls_server.client() as c:
        assert c.get("/v2/health/live").status_code == 200


def _tls_exchange(server, pki: Path, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send ``data`` over a TLS connection and read until the server closes it (or ``wait_s``):
    what came back and how long it took."""
    host, port = server.host_port.split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as raw, \
            client_tls(pki).wrap_socket(raw, server_hostname=host) as sock:
        answer = b""
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                answer += chunk
        except (OSError, ssl.SSLError):   # closed while sending, or reset: the server ended it
            pass
        return answer, time.monotonic() - started


def test_the_connection_guards_hold_inside_tls(tls_server, pki):
    """The request-head deadline, the body deadline and the head size limit read the decrypted
    stream as they read a plaintext one: a stalled head is closed, a stalled body answered 408, an
    oversized head 431, and a TLS handshake that never starts holds nothing others need."""
    idle = [socket.create_connection(tls_server.host_port.split(":")) for _ in range(50)]   # no handshake
    try:
        answer, took = _tls_exchange(tls_server, pki, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", 10)
        assert answer == b"" and took < 6, (answer[:200], took)
        answer, took = _tls_exchange(tls_server, pki, b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{", 10)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer and took < 6, (answer[:200], took)
        answer, _ = _tls_exchange(tls_server, pki, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: "
                                  + b"a" * 1_000_000 + b"\r\n\r\n", 10)
        assert answer.startswith(b"HTTP/1.1 431") and b"headers_too_large" in answer, answer[:200]
        with tls_server.client() as c:
            assert c.get("/v2/health/live").status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_mutual_tls_serves_a_client_the_ca_signed_and_refuses_others(mtls_server, pki):
    rest, rpc = _triton_http(mtls_server, pki, "client"), _triton_grpc(mtls_server, pki, "client")
    for name in OUTPUTS:
        np.testing.assert_array_equal(rest[name], rpc[name], err_msg=name)
    for client in (None, "intruder"):   # no certificate, or one from a CA the server does not trust
        with pytest.raises(httpx.TransportError):
            httpx.get(mtls_server.url + "/v2/health/live", verify=client_tls(pki, client), timeout=10)
        with pytest.raises(InferenceServerException):
            _triton_grpc(mtls_server, pki, client)
        with pytest.raises(grpc.RpcError) as info:
            _grpc_live(mtls_server.grpc_target, _grpc_credentials(pki, client))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with mtls_server.client() as c:   # and the server goes on
        assert c.get("/v2/health/live").status_code == 200


def _openssl_expiry(pem: Path) -> float:
    """A certificate's notAfter as the openssl command reads it, UNIX seconds."""
    out = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(pem)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return float(ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]))


def _served_expiry(server, trust: ssl.SSLContext | None = None) -> float:
    with server.client(**({"verify": trust} if trust else {})) as c:
        return metric_value(c.get("/metrics").text, "hjserve_tls_certificate_expiry_timestamp_seconds",
                            certificate="server")


def test_a_certificates_expiry_is_read_as_openssl_reads_it(pki, tmp_path):
    """UTCTime (to 2049) and GeneralizedTime (from 2050) notAfter fields, and a chain: its earliest."""
    _openssl_cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=far", "-days", "30000",
                    "-keyout", str(tmp_path / "far.key"), "-out", str(tmp_path / "far.pem")]
    subprocess.run(_openssl_cmd, check=True, capture_output=True, timeout=60)
    for pem in (pki / "server.pem", pki / "renewed.pem", pki / "ca.pem", tmp_path / "far.pem"):
        assert tls.certificate_expiry(pem.read_bytes()) == _openssl_expiry(pem), pem.name
    assert _openssl_expiry(tmp_path / "far.pem") > 2_600_000_000   # past 2050: GeneralizedTime
    chain = (tmp_path / "far.pem").read_bytes() + (pki / "server.pem").read_bytes()
    assert tls.certificate_expiry(chain) == _openssl_expiry(pki / "server.pem")
    with pytest.raises(ValueError, match="no PEM certificate"):
        tls.certificate_expiry((pki / "server.key").read_bytes())


def test_a_plaintext_server_exports_no_certificate_expiry(server):
    """No series at all (not a 0 the expiry alert would read as long expired)."""
    with server.client() as c:
        assert "hjserve_tls_certificate_expiry_timestamp_seconds{" not in c.get("/metrics").text


def _trusted_by(server, pki: Path) -> set[str]:
    """Which of the two CAs a new connection to each transport trusts the server by: {"http ca",
    "grpc rogue", ...}."""
    found = set()
    for ca in ("ca", "rogue"):
        try:
            httpx.get(server.url + "/v2/health/live", verify=client_tls(pki, ca=ca),
                      timeout=10)
            found.add(f"http {ca}")
        except httpx.ConnectError:
            pass
        try:
            _grpc_live(server.grpc_target, grpc.ssl_channel_credentials((pki / f"{ca}.pem").read_bytes()))
            found.add(f"grpc {ca}")
        except grpc.RpcError:
            pass
    return found


def test_a_renewed_certificate_is_served_without_a_restart(tiny_repo, pki, tmp_path):
    """A certificate renewed in place (a rotated Kubernetes Secret, certbot) is served to new
    connections on both transports within ``tls_reload_s``; one copied before its key (a pair that
    does not match) is refused and logged, and the previous certificate goes on serving. On
    42a36e8 the files were read once: the renewed certificate waited for a restart, and the
    expired one went on being served."""
    live = tmp_path / "tls"
    live.mkdir()
    (live / "tls.crt").write_bytes((pki / "server.pem").read_bytes())
    (live / "tls.key").write_bytes((pki / "server.key").read_bytes())
    with run_server(tiny_repo, tmp_path, grpc=True, tls_context=client_tls(pki), tls_cert_file=live / "tls.crt",
                    tls_key_file=live / "tls.key", tls_reload_s=0.2, log_level="info") as s:
        assert _trusted_by(s, pki) == {"http ca", "grpc ca"}
        assert _served_expiry(s) == _openssl_expiry(pki / "server.pem")
        (live / "tls.crt").write_bytes((pki / "renewed.pem").read_bytes())    # the key comes later
        deadline = time.monotonic() + 15
        while "were not loaded" not in s.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "were not loaded" in s.log.read_text() and "does not match" in s.log.read_text()
        assert _trusted_by(s, pki) == {"http ca", "grpc ca"}
        (live / "tls.key").write_bytes((pki / "renewed.key").read_bytes())
        while _trusted_by(s, pki) != {"http rogue", "grpc rogue"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _trusted_by(s, pki) == {"http rogue", "grpc rogue"}
        assert "TLS certificate loaded again" in s.log.read_text()
        assert _served_expiry(s, client_tls(pki, ca="rogue")) == _openssl_expiry(pki / "renewed.pem")   # the metric follows
        assert s.log.read_text().count("were not loaded") == 1   # once per change, not once per look


@pytest.fixture
def _repository(monkeypatch, tmp_path):
    monkeypatch.setenv("HJSERVE_MODEL_REPOSITORY", str(tmp_path))


@pytest.mark.usefixtures("_repository")
@pytest.mark.parametrize(("files", "message"), [
    ({"tls_cert_file": "server.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_key_file": "server.key"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file needs tls_cert_file and tls_key_file"),
    ({"tls_cert_file": "nope.pem", "tls_key_file": "server.key"}, "tls_cert_file 'nope.pem' is not a readable file"),
    ({"tls_cert_file": "server.pem", "tls_key_file": "client.key"}, "does not match"),
    ({"tls_cert_file": "server.key", "tls_key_file": "server.key"}, "not a PEM certificate"),
    ({"tls_cert_file": "server.pem", "tls_key_file": "server.pem"}, "not a PEM private key"),
    ({"tls_cert_file": "server.pem", "tls_key_file": "encrypted.key"}, "encrypted with a passphrase"),
    ({"tls_cert_file": "server.pem", "tls_key_file": "server.key", "tls_client_ca_file": "server.key"},
     "tls_client_ca_file .* holds no PEM certificate"),
    # a device or a directory, not a file: /dev/zero was read until memory ran out
    ({"tls_cert_file": "/dev/zero", "tls_key_file": "server.key"}, "tls_cert_file '/dev/zero' is not a readable file"),
    ({"tls_cert_file": "server.pem", "tls_key_file": "."}, "tls_key_file '.' is not a readable file"),
    ({"tls_cert_file": "huge.pem", "tls_key_file": "server.key"}, "larger than 4 MiB"),
])
def test_tls_files_are_checked_when_the_settings_are_read(pki, monkeypatch, files, message):
    """Every TLS refusal names the setting and says what is wrong; no key is ever printed."""
    monkeypatch.chdir(pki)
    if not (pki / "huge.pem").exists():
        (pki / "huge.pem").write_bytes((pki / "server.pem").read_bytes() * 4000)
    with pytest.raises(ValueError, match=message) as info:
        Settings(**files)
    assert "PRIVATE KEY" not in str(info.value) and "hunter2" not in str(info.value)


def test_an_encrypted_key_stops_the_start_with_a_message_not_a_prompt(pki, tmp_path):
    """OpenSSL asks a terminal for the passphrase of an encrypted key: a server started in a
    terminal would wait there for ever. It exits at once with a message instead."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HJSERVE_")}
    env.update(HJSERVE_TLS_CERT_FILE=str(pki / "server.pem"), HJSERVE_TLS_KEY_FILE=str(pki / "encrypted.key"))
    out = subprocess.run([sys.executable, "-m", "service", "--model-repository", str(tmp_path), "--port", "0"],
                         env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "encrypted with a passphrase" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.usefixtures("_repository")
def test_keys_in_clear_text_off_loopback_are_warned_about(pki):
    warning = tls.clear_text_warning
    assert warning(Settings(host="0.0.0.0", api_keys="k-1")) is not None
    assert "HJSERVE_TLS_CERT_FILE" in warning(Settings(host="10.1.2.3", admin_key="adm-1"))
    assert warning(Settings(host="127.0.0.1", api_keys="k-1")) is None      # loopback: never on a wire
    assert warning(Settings(host="0.0.0.0")) is None                        # no key to leak
    assert warning(Settings(host="0.0.0.0", api_keys="k-1", tls_cert_file=pki / "server.pem",
                            tls_key_file=pki / "server.key")) is None
