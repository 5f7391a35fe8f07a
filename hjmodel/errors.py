"""hjmodel's exceptions. They carry no transport codes: the service maps them in one table."""

from __future__ import annotations

__all__ = ["ArtifactError", "CalibrationError", "ConfigError", "DataError", "HJModelError", "InputError"]


class HJModelError(Exception):
    """Base class of every error hjmodel raises on purpose."""


class ArtifactError(HJModelError):
    """An artifact is missing, corrupt, truncated, of an unknown kind or format, or unsafe."""


class CalibrationError(HJModelError, ValueError):
    """The OOD gate cannot be calibrated as asked (e.g. an alpha the calibration split cannot reach)."""


class ConfigError(HJModelError, ValueError):
    """A training setting lies outside the range it has a meaning in (e.g. eps <= 0)."""


class DataError(HJModelError):
    """A training dataset cannot be loaded or is malformed."""


class InputError(HJModelError):
    """Inputs to a model have the wrong shape, dtype or non-finite values."""
