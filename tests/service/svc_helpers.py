"""Helpers of the service tests: the tiny fixture model, real server processes, in-process references."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))   # tests/: shared helpers (also when imported by bench/)

import tiny_model  # noqa: E402

from service.testing import (  # noqa: E402,F401
    Server,
    copy_version,
    free_port,
    memory_mib,
    metric_value,
    run_server,
    stop_process,
)


def export_tiny(path: Path, task: str = "classification", seed: int = 0, batched_tau: bool = True) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model.export(path, task, seed, batched_tau)


def reference_outputs(version_dir: Path, x, tau: float = 0.1) -> dict:
    """Every contract output computed in-process on the same artifact: hjmodel's serving module
    when the version has a torch artifact, else the ONNX graph itself (the tiny fixture)."""

    version_dir = Path(version_dir)
    if (version_dir / "model.pt").is_file():
        import torch

        from hjmodel.artifact import load_serving_module

        module = load_serving_module(version_dir).eval()
        with torch.no_grad():
            out = module(torch.as_tensor(np.asarray(x, np.float32)), torch.full((len(x), 1), tau, dtype=torch.float64))
        return {k: v.detach().cpu().numpy() for k, v in out.items()}
    return tiny_model.reference(version_dir, x, tau)


def train_artifact(dataset: str, version_dir: Path, kind: str = "lse") -> Path:
    """A small real hjmodel artifact (ONNX + torch) trained for a few epochs."""
    from hjmodel.artifact import save_artifact
    from hjmodel.data import load_dataset
    from hjmodel.train import TrainConfig, train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = train(load_dataset(dataset), TrainConfig(kind=kind, epochs=3, progress=False, reference_size=50,
                                                            memory_size=100))
        save_artifact(model, version_dir)
    return version_dir


def assert_outputs_close(got: np.ndarray, want: np.ndarray, name: str, rtol: float = 2e-5,
                         atol: float = 2e-6) -> None:
    """Served vs in-process tensors: integers (and booleans) exactly, floats to float32 precision."""
    assert got.shape == want.shape, name
    if want.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want, err_msg=name)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _openssl(pki: Path, *args: str) -> None:
    assert shutil.which("openssl"), "the TLS tests make their certificates with the openssl command"
    subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True, timeout=60)


def _issue(pki: Path, name: str, ca: str, usage: str, san: str = "", days: int = 2) -> None:
    """A key ``<name>.key`` and a certificate ``<name>.pem`` for ``name``, signed by ``ca``."""
    _openssl(pki, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")
    (pki / f"{name}.ext").write_text(f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
    _openssl(pki, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", str(days), "-extfile", f"{name}.ext")


def make_pki(pki: Path) -> Path:
    """Test certificates in ``pki`` (the openssl command): two certificate authorities (``ca``;
    ``rogue``, which a test server does not trust), a server certificate for 127.0.0.1 from ``ca``
    (``server.pem`` / ``server.key``, 2 days) and one from ``rogue`` (``renewed``, 30 days), a client certificate from
    each (``client``, ``intruder``), and
    the server's key again encrypted with a passphrase (``encrypted.key``)."""
    for ca in ("ca", "rogue"):
        _openssl(pki, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=hjserve test {ca}")
    _issue(pki, "server", "ca", "serverAuth", san="IP:127.0.0.1,DNS:localhost")
    _issue(pki, "client", "ca", "clientAuth")
    _issue(pki, "intruder", "rogue", "clientAuth")
    _issue(pki, "renewed", "rogue", "serverAuth", san="IP:127.0.0.1,DNS:localhost", days=30)
    _openssl(pki, "pkey", "-in", "server.key", "-aes256", "-passout", "pass:hunter2", "-out", "encrypted.key")
    return pki


def client_tls(pki: Path, client: str | None = None, ca: str = "ca") -> ssl.SSLContext:
    """A client's TLS context over :func:`make_pki`'s files: trusts ``ca`` (``ca`` or ``rogue``), and
    presents ``client``'s certificate when given (mutual TLS)."""
    context = ssl.create_default_context(cafile=str(pki / f"{ca}.pem"))
    if client:
        context.load_cert_chain(pki / f"{client}.pem", pki / f"{client}.key")
    return context
