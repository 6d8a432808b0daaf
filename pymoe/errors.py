"""Exceptions raised by pymoe; each carries the C status code and message."""
from __future__ import annotations


class PymoeError(Exception):
    """A libpymoe call failed. `code` is the PYMOE_E* status, `message` the detail."""

    code: int = 0

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(PymoeError, ValueError):
    code = -1


class ModelNotFoundError(PymoeError, FileNotFoundError):
    code = -2


class ModelFormatError(PymoeError):
    code = -3


class OutOfMemoryError(PymoeError, MemoryError):
    code = -4


class TokenOutOfVocabularyError(PymoeError, ValueError):
    code = -5


class ContextFullError(PymoeError):
    code = -6


class InvalidStateError(PymoeError):
    code = -7


class StaleLogitsError(InvalidStateError):
    """A logits view was used after the session's next feed, rewind, reset or close."""


class ClosedError(InvalidStateError):
    """The model or session has been closed."""


class AbortedError(PymoeError):
    code = -8


class BackendError(PymoeError):
    code = -9


class UnsupportedError(PymoeError):
    code = -10


class PymoeWarning(UserWarning):
    """A warning from libpymoe (delivered through its log callback)."""


BY_CODE = {cls.code: cls for cls in (
    InvalidArgumentError, ModelNotFoundError, ModelFormatError, OutOfMemoryError,
    TokenOutOfVocabularyError, ContextFullError, InvalidStateError, AbortedError,
    BackendError, UnsupportedError)}
