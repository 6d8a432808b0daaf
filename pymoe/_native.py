"""The binding in use: the one status check, the C -> Python callbacks of the log and of
load progress, and NativeObject (the lifetime of every C object)."""
from __future__ import annotations

import logging
import warnings
import weakref

from . import errors
from ._compiled import ffi, lib

logger = logging.getLogger("pymoe")
logger.addHandler(logging.NullHandler())  # silent unless the application configures logging
llama_logger = logging.getLogger("pymoe.llama")

_LEVELS = {lib.PYMOE_LOG_DEBUG: logging.DEBUG, lib.PYMOE_LOG_INFO: logging.INFO,
           lib.PYMOE_LOG_WARN: logging.WARNING, lib.PYMOE_LOG_ERROR: logging.ERROR}


def raise_for(rc: int) -> None:
    """Raise the typed exception for a non-zero status, with the library's detail."""
    detail = ffi.string(lib.pymoe_last_error()).decode("utf-8", "replace")
    if not detail:
        detail = ffi.string(lib.pymoe_strerror(rc)).decode()
    raise errors.BY_CODE.get(rc, errors.PymoeError)(detail, rc)


def check(rc: int) -> None:
    if rc != 0:
        raise_for(rc)


@ffi.def_extern()
def _pymoe_on_log(level, source, line, user_data):
    text = ffi.string(line).decode("utf-8", "replace")
    py_level = _LEVELS.get(level, logging.INFO)
    if source == lib.PYMOE_LOG_FROM_PYMOE:
        logger.log(py_level, "%s", text)
        if level >= lib.PYMOE_LOG_WARN:
            warnings.warn(text, errors.PymoeWarning, stacklevel=2)
    elif llama_logger.isEnabledFor(py_level):
        llama_logger.log(py_level, "%s", text)


def _progress_error(exc_type, exc_value, tb):
    """An exception that escaped the callback below (Ctrl-C arriving as Python
    enters it): hand it to the load like the others. cffi then returns False."""
    while tb is not None:
        user_data = tb.tb_frame.f_locals.get("user_data")
        if user_data is not None:
            ffi.from_handle(user_data).error = exc_value
            return
        tb = tb.tb_next


@ffi.def_extern(onerror=_progress_error)
def _pymoe_on_progress(fraction, user_data):
    """Call the user's progress function; an exception (Ctrl-C too) aborts the load
    and is re-raised by the caller once the C call has returned."""
    state = ffi.from_handle(user_data)
    try:
        return state.callback(fraction) is not False
    except BaseException as exc:  # noqa: BLE001 - carried across the C frame
        state.error = exc
        return False


# Installing the callback may warn once (a GPU build with no usable GPU): shown
# as one line from "pymoe", not as a line of this file with its source.
with warnings.catch_warnings(record=True) as _caught:
    warnings.simplefilter("always")
    lib.pymoe_log_set(lib._pymoe_on_log, ffi.NULL)
for _w in _caught:
    warnings.warn_explicit(_w.message, _w.category, "pymoe", 0)


def show_log(level: int = logging.INFO) -> None:
    """Print libpymoe's and llama.cpp's log on stderr from `level` up."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


class NativeObject:
    """Owns one C object: explicit, idempotent close(); a context manager; a
    finalizer as the backstop for objects nobody closed."""

    _ptr = None
    _kind = "object"  # for messages: "the model is closed"

    def _own(self, ptr, free) -> None:
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, free, ptr)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        if self._ptr is None:
            return
        self._before_close()
        self._ptr = None
        self._finalizer()

    def _before_close(self) -> None:
        """What must happen while the C object still exists."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self):
        if self._ptr is None:
            raise errors.ClosedError(f"the {self._kind} is closed", lib.PYMOE_ESTATE)
        return self._ptr
