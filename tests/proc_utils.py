"""Process helpers shared by the test packages: the package's own (:mod:`service.testing`)."""

from __future__ import annotations

from service.testing import stop_process

__all__ = ["stop_process"]
