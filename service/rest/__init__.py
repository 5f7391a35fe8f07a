"""The REST transport: thin FastAPI routers over the transport-free dataplane."""

from service.rest.app import create_app

__all__ = ["create_app"]
