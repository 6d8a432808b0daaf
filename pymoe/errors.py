"""Exceptions raised by pymoe; each carries the C status code and message."""
from __future__ import annotations

from ._compiled import lib


class PymoeError(Exception):
    """A libpymoe call failed. `code` is the PYMOE_E* status, `message` the detail."""

    code: int = 0

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(PymoeError, ValueError):
    code = lib.PYMOE_EINVAL


class ModelNotFoundError(PymoeError, FileNotFoundError):
    code = lib.PYMOE_ENOENT


class ModelFormatError(PymoeError):
    code = lib.PYMOE_EFORMAT


class OutOfMemoryError(PymoeError, MemoryError):
    code = lib.PYMOE_ENOMEM


class TokenOutOfVocabularyError(PymoeError, ValueError):
    code = lib.PYMOE_ETOKEN


class ContextFullError(PymoeError):
    code = lib.PYMOE_ECONTEXT


class InvalidStateError(PymoeError):
    code = lib.PYMOE_ESTATE


class StaleLogitsError(InvalidStateError):
    """A logits view was used after the session's next feed, rewind, reset or close."""


class ClosedError(InvalidStateError):
    """The model or session has been closed."""


class BusyError(InvalidStateError):
    """The object is inside another call: one from another thread, or the call
    whose callback is running now (a callback cannot close or re-enter it)."""


class AbortedError(PymoeError):
    code = lib.PYMOE_EABORTED


class BackendError(PymoeError):
    code = lib.PYMOE_EBACKEND


class UnsupportedError(PymoeError):
    code = lib.PYMOE_EUNSUPPORTED


class NonFiniteLogitsError(PymoeError, ArithmeticError):
    """A model's logits held NaN or infinite values (its weights are likely corrupt, or its values overflow):
    nothing can be sampled from them. The message names the row and its position."""
    code = lib.PYMOE_ENUMERIC


class PymoeWarning(UserWarning):
    """A warning from libpymoe (delivered through its log callback)."""


BY_CODE = {cls.code: cls for cls in (
    InvalidArgumentError, ModelNotFoundError, ModelFormatError, OutOfMemoryError,
    TokenOutOfVocabularyError, ContextFullError, InvalidStateError, AbortedError,
    BackendError, UnsupportedError, NonFiniteLogitsError)}
