"""TLS for both transports: one certificate and key serve HTTP (uvicorn) and gRPC, and an optional
client CA turns on mutual TLS for both.

The files are checked when the settings are read (:func:`check_files`), with the same OpenSSL
the HTTP server uses, so a wrong path, a key that does not match its certificate or a file that is
not PEM stops the start with the setting's name -- not a traceback from uvicorn or grpcio, and never
the key's bytes. A key encrypted with a passphrase is refused: OpenSSL would ask a terminal for it,
and a server started in one would wait there for ever (mount the key unencrypted, readable by the
server's user only). Python's server context takes TLS 1.2 at least.

A renewed certificate is served without a restart (:class:`CertificateReloader`): every
``tls_reload_s`` the files' identities are compared with those last loaded, and changed files that
pass :func:`check_files` are loaded into the HTTP server's context and handed to gRPC's dynamic
credentials, both for new connections (open ones keep their session). Changed files that do not
pass (a certificate copied before its key) are logged and left out, and the previous certificate
goes on serving until they do.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import ipaddress
import logging
import os
import re
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from service.settings import Settings

__all__ = ["CertificateReloader", "certificate_expiry", "check_files", "clear_text_warning", "uvicorn_options"]

log = logging.getLogger("service.tls")


class _Encrypted(Exception):
    """Raised by the passphrase callback: the key needs one."""


def _refuse_passphrase() -> bytes:
    raise _Encrypted


#: The largest TLS file read (a certificate bundle of a thousand certificates fits): a path such as
#: /dev/zero would otherwise be read until memory ran out.
MAX_FILE_BYTES = 4 * 1024 * 1024


def _read(setting: str, path: Path) -> bytes:
    """A TLS file's bytes, refused (naming ``setting``) when it cannot be read, is not a regular file
    or is larger than any certificate or key file."""
    try:
        if not Path(path).is_file():
            raise ValueError(f"{setting} {str(path)!r} is not a readable file (not a regular file)")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{setting} {str(path)!r} is not a readable file ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{setting} {str(path)!r} is larger than {MAX_FILE_BYTES >> 20} MiB: not a certificate "
                         "or key file")
    return data


def check_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> dict[str, bytes]:
    """Refuse (``ValueError``, naming the setting) TLS files the server could not serve with; else
    the bytes checked, by setting name (empty without TLS), for what is built from them."""
    if (cert is None) != (key is None):
        raise ValueError("tls_cert_file and tls_key_file go together: set both (TLS) or neither")
    if cert is None:
        if client_ca is not None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file: mutual TLS is TLS first")
        return {}
    read = {setting: _read(setting, path) for setting, path in
            (("tls_cert_file", cert), ("tls_key_file", key), ("tls_client_ca_file", client_ca)) if path is not None}
    if b"-----BEGIN CERTIFICATE-----" not in read["tls_cert_file"]:
        raise ValueError(f"tls_cert_file {str(cert)!r} is not a PEM certificate (chain)")
    if b"PRIVATE KEY-----" not in read["tls_key_file"]:
        raise ValueError(f"tls_key_file {str(key)!r} is not a PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _Encrypted:
        raise ValueError(f"tls_key_file {str(key)!r} is encrypted with a passphrase, which the server cannot "
                         "ask for: give it the key unencrypted (readable by its user only)") from None
    except ssl.SSLError as exc:
        reason = exc.reason or exc.__class__.__name__
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise ValueError(f"tls_key_file {str(key)!r} does not match the certificate of tls_cert_file "
                             f"{str(cert)!r}") from None
        raise ValueError(f"tls_cert_file / tls_key_file: OpenSSL cannot use them ({reason})") from None
    if client_ca is not None:
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            verify.load_verify_locations(cafile=client_ca)
            found = bool(verify.get_ca_certs())
        except ssl.SSLError:
            found = False
        if not found:
            raise ValueError(f"tls_client_ca_file {str(client_ca)!r} holds no PEM certificate to verify "
                             "clients with")
    return read


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _der_items(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The DER elements between ``start`` and ``end``: (tag, content start, content end) each."""
    while start < end:
        tag, length = der[start], der[start + 1]
        start += 2
        if length & 0x80:   # long form: the next (length & 0x7f) bytes hold the length
            count = length & 0x7F
            length = int.from_bytes(der[start:start + count], "big")
            start += count
        yield tag, start, start + length
        start += length


def _not_after(der: bytes) -> float:
    """A DER X.509 certificate's notAfter, UNIX seconds (RFC 5280: Certificate -> TBSCertificate ->
    [version], serialNumber, signature, issuer, validity (notBefore, notAfter))."""
    _, start, end = next(_der_items(der, 0, len(der)))          # Certificate
    _, start, end = next(_der_items(der, start, end))            # TBSCertificate
    fields = list(_der_items(der, start, end))
    if fields[0][0] == 0xA0:                                     # explicit [0] version
        fields = fields[1:]
    _, start, end = fields[3]                                    # validity
    tag, start, end = list(_der_items(der, start, end))[1]      # notAfter
    text = der[start:end].decode("ascii")
    if tag == 0x17:   # UTCTime YYMMDDHHMMSSZ: 50-99 are 19YY, 00-49 20YY (RFC 5280 4.1.2.5.1)
        year, text = int(text[:2]), text[2:]
        year += 1900 if year >= 50 else 2000
    else:             # GeneralizedTime YYYYMMDDHHMMSSZ
        year, text = int(text[:4]), text[4:]
    month, day, hour, minute, second = (int(text[i:i + 2]) for i in range(0, 10, 2))
    return float(calendar.timegm((year, month, day, hour, minute, second)))


def certificate_expiry(pem: bytes) -> float:
    """When a PEM certificate chain stops being valid: the earliest notAfter of its certificates
    (UNIX seconds)."""
    blocks = _PEM_CERTIFICATE.findall(pem.decode("ascii", "replace"))
    if not blocks:
        raise ValueError("no PEM certificate")
    return min(_not_after(ssl.PEM_cert_to_DER_cert(block)) for block in blocks)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.Config`` that serve HTTPS (none: plaintext HTTP)."""
    if settings.tls_cert_file is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
    if settings.tls_client_ca_file is not None:
        options.update(ssl_ca_certs=str(settings.tls_client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class CertificateReloader:
    """The served certificate of both transports, read again when its files change (module docstring).

    The HTTP server's :class:`ssl.SSLContext` is registered with :meth:`add_context` once uvicorn has
    made it; :meth:`grpc_credentials` are the gRPC port's. Started and stopped with the app like a
    transport; with ``tls_reload_s`` 0 it never looks again."""

    def __init__(self, settings: Settings):
        self.cert, self.key, self.client_ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        self.interval_s = settings.tls_reload_s
        self.contexts: list[ssl.SSLContext] = []
        self._loaded = self._identity()
        self._refused: tuple | None = None
        files = check_files(self.cert, self.key, self.client_ca)
        self._grpc_current = self._grpc_configuration(files)
        self._record_expiry(files["tls_cert_file"])
        self._grpc_new: Any = None           # a configuration gRPC has not fetched yet
        self._lock = threading.Lock()       # gRPC fetches from its own threads
        self._task: asyncio.Task | None = None

    def _files(self) -> list[Path]:
        return [Path(p) for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _identity(self) -> tuple | None:
        """Which files the paths name now: device, inode, size, modification time of each (a
        Kubernetes Secret volume swaps a symlink to new files); None while one cannot be read."""
        try:
            return tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, self._files()))
        except OSError:
            return None

    @staticmethod
    def _grpc_configuration(files: dict[str, bytes]) -> Any:
        """gRPC's certificate configuration of the checked bytes (:func:`check_files`)."""
        import grpc

        return grpc.ssl_server_certificate_configuration(
            [(files["tls_key_file"], files["tls_cert_file"])], root_certificates=files.get("tls_client_ca_file"))

    @staticmethod
    def _record_expiry(cert: bytes) -> None:
        """``hjserve_tls_certificate_expiry_timestamp_seconds`` of the certificate now served."""
        from service import metrics

        try:
            expiry = certificate_expiry(cert)
        except Exception as exc:   # OpenSSL took it; a form this reader does not know costs the gauge only
            log.warning("cannot read when the served TLS certificate expires (%s): no expiry metric", exc)
            with contextlib.suppress(KeyError):   # no stale value from the previous certificate
                metrics.TLS_CERTIFICATE_EXPIRY.remove("server")
            return
        metrics.TLS_CERTIFICATE_EXPIRY.labels("server").set(expiry)

    def add_context(self, context: ssl.SSLContext) -> None:
        self.contexts.append(context)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """gRPC's dynamic credentials: a new connection's handshake fetches the newest configuration."""
        import grpc

        return grpc.dynamic_ssl_server_credentials(self._grpc_current, self._fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def _fetch(self) -> Any:
        with self._lock:
            new, self._grpc_new = self._grpc_new, None
        return new   # None: unchanged

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed and pass :func:`check_files`; True when it did."""
        identity = self._identity()
        if identity is None or identity == self._loaded:
            return False
        try:
            files = check_files(self.cert, self.key, self.client_ca)
            for context in self.contexts:
                context.load_cert_chain(self.cert, self.key, password=_refuse_passphrase)
                if self.client_ca is not None:
                    context.load_verify_locations(cafile=self.client_ca)
            configuration = self._grpc_configuration(files)
        except (ValueError, OSError, ssl.SSLError, _Encrypted) as exc:
            if identity != self._refused:    # once per change, not once per look
                log.warning("TLS files changed but were not loaded (the previous certificate is still served): %s",
                            exc)
                self._refused = identity
            return False
        with self._lock:
            self._grpc_new = configuration
        self._loaded = identity
        self._record_expiry(files["tls_cert_file"])
        log.info("TLS certificate loaded again from %s (new connections use it)", self.cert)
        return True

    async def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.reload_if_changed()
            except Exception:   # never the end of the watch
                log.exception("checking the TLS files failed")

    def drain(self, grace_s: float) -> None:
        """A shutdown began: nothing to do (the connections in flight keep their certificate)."""

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def clear_text_warning(settings: Settings) -> str | None:
    """A warning for the log when keys guard the server but would cross a network in clear text
    (keys set, no TLS, not bound to loopback); None otherwise. It is a warning, not a refusal: TLS is
    often ended before the server (a Kubernetes ingress or a service mesh)."""
    if settings.tls_cert_file is not None or not (settings.api_keys or settings.admin_key) \
            or _loopback(settings.host):
        return None
    return (f"API / admin keys are set but the server listens on {settings.host} without TLS: every key "
            "crosses the network in clear text. Set HJSERVE_TLS_CERT_FILE and HJSERVE_TLS_KEY_FILE, or end "
            "TLS in front of the server (an ingress, a service mesh) and keep this port off other networks")
