"""``python -m service`` / ``hjserve``: run the server (HTTP with uvicorn, and gRPC when a port is set)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
from collections.abc import Callable, Sequence

import uvicorn

__all__ = ["DrainingServer", "build", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hjserve", description="Serve hjmodel artifacts over the Open Inference "
                                "Protocol (KServe V2), REST and gRPC. Every option also reads HJSERVE_<OPTION> "
                                "from the environment.")
    p.add_argument("--model-repository", help="model repository root (<root>/<model>/<version>/)")
    p.add_argument("--host", help="interface to bind (HTTP and gRPC)")
    p.add_argument("--port", type=int, help="HTTP port")
    p.add_argument("--grpc-port", type=int, help="gRPC port (unset: no gRPC server)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", choices=["auto", "onnx", "torch"])
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-ms", type=float)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--model-control-mode", choices=["none", "explicit", "poll"])
    p.add_argument("--tracing", choices=["off", "on", "otlp", "console"])
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def build(settings):
    """settings -> repository -> dataplane -> the HTTP app, with the gRPC transport when
    ``grpc_port`` is set (both on one event loop, over one dataplane), and with TLS settings the
    certificate reloader both transports' certificates come from (``app.state.tls``, else None)."""
    from service import tracing
    from service.dataplane import DataPlane
    from service.repository import ModelRepository
    from service.rest.app import create_app
    from service.tls import CertificateReloader

    tracing.configure(settings.tracing)
    dataplane = DataPlane(settings, ModelRepository(settings))
    reloader = CertificateReloader(settings) if settings.tls_cert_file is not None else None
    transports = [reloader] if reloader is not None else []
    if settings.grpc_port is not None:
        from service.grpc.server import GRPCServer

        transports.append(GRPCServer(dataplane, settings.host, settings.grpc_port,
                                     reloader.grpc_credentials() if reloader is not None else None))
    app = create_app(dataplane, transports)
    app.state.tls = reloader
    return app


def check_grpc_port(host: str, port: int | None) -> None:
    """Exit with a message (status 1) when the gRPC port cannot be listened on -- taken by another
    process, or a host that is no address here -- instead of a traceback from the server's startup.
    The gRPC server itself listens without SO_REUSEPORT (``grpc.so_reuseport`` 0), so a port taken
    in between still fails its start rather than being shared with the other process."""
    if not port:   # no gRPC, or a port the system picks
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            # as grpcio binds: a port left in TIME_WAIT is free, one another socket listens on is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            probe.listen()
    except OSError as exc:
        raise SystemExit(f"hjserve: cannot listen for gRPC on {host}:{port}: {exc.strerror or exc}") from None


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which calls ``on_shutdown()`` (the app's ``drain``) as its shutdown begins
    -- after SIGTERM or SIGINT, before it stops listening and waits for the requests in flight --
    on the event loop (not in the signal handler, where uvicorn only sets a flag)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets=sockets)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (over environment settings) and serve until interrupted."""
    args = _parser().parse_args(argv)
    from pydantic import ValidationError

    from service import tls
    from service.logs import configure_logging
    from service.rest.app import load_shedder
    from service.rest.guards import guarded_protocol
    from service.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:   # a message and exit status 1, not a traceback
        raise SystemExit(f"hjserve: {exc}") from None
    check_grpc_port(settings.host, settings.grpc_port)
    configure_logging(settings.log_level, settings.log_format)
    if (warning := tls.clear_text_warning(settings)) is not None:
        logging.getLogger("service").warning("%s", warning)
    app = build(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, log_config=None,   # hjserve.access writes the access lines
                            timeout_graceful_shutdown=settings.shutdown_grace_s, loop="uvloop",
                            http=guarded_protocol(settings.header_timeout_s, load_shedder(app.state.dataplane),
                                                  settings.retry_after_s, settings.max_header_bytes,
                                                  settings.send_timeout_s, app.state.dataplane.request_memory),
                            limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s,
                            **tls.uvicorn_options(settings))
    config.load()   # makes uvicorn's TLS context, which the reloader loads renewed certificates into
    if app.state.tls is not None:
        app.state.tls.add_context(config.ssl)
    server = DrainingServer(config, app.state.drain)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:   # as uvicorn.run: a failed startup is exit status 3
        sys.exit(3)


if __name__ == "__main__":
    main()
