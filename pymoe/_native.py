"""The binding in use: the one status check, the C -> Python callbacks of the log and of
load progress, and NativeObject (the lifetime of every C object)."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
import weakref

from . import errors
from ._compiled import ffi, lib

logger = logging.getLogger("pymoe")
logger.addHandler(logging.NullHandler())  # silent unless the application configures logging
llama_logger = logging.getLogger("pymoe.llama")

_LEVELS = {lib.PYMOE_LOG_DEBUG: logging.DEBUG, lib.PYMOE_LOG_INFO: logging.INFO,
           lib.PYMOE_LOG_WARN: logging.WARNING, lib.PYMOE_LOG_ERROR: logging.ERROR}


# Ctrl-C that arrived while Python ran a callback from C: cffi cannot pass it up through the C frames, so the
# callback's error hook keeps it here, stops the call (pymoe_interrupt) and raise_for re-raises it.
_interrupted: list = []


def raise_for(rc: int) -> None:
    """Raise the typed exception for a non-zero status, with the library's detail."""
    if rc == lib.PYMOE_EABORTED and _interrupted:
        raise _interrupted.pop()
    detail = ffi.string(lib.pymoe_last_error()).decode("utf-8", "replace")
    if not detail:
        detail = ffi.string(lib.pymoe_strerror(rc)).decode()
    raise errors.BY_CODE.get(rc, errors.PymoeError)(detail, rc)


def check(rc: int) -> None:
    if rc != 0:
        raise_for(rc)


def _callback_error(exc_type, exc_value, tb):
    """A callback from C raised: Ctrl-C stops the call that is running and is raised by it once it returns;
    anything else is reported as Python reports errors it cannot raise."""
    if isinstance(exc_value, KeyboardInterrupt):
        _interrupted[:] = [exc_value]
        lib.pymoe_interrupt()
    else:
        sys.unraisablehook(sys.UnraisableHookArgs(exc_type, exc_value, tb, "in a pymoe callback from C", None))


def interrupt_on_ctrl_c() -> None:
    """Before a long C call: Ctrl-C stops it (the C library's SIGINT handler goes first, then Python's)."""
    del _interrupted[:]
    lib.pymoe_interrupt_on_sigint()


@ffi.def_extern(onerror=_callback_error)
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
    _callback_error(exc_type, exc_value, tb)


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


def _free(free, ptr, keep_alive) -> None:
    """A finalizer's work. keep_alive (the objects this one's C object points
    into: a session's model, a loop's sessions) is held by the finalizer until
    it has run, so the cycle collector cannot free them first."""
    free(ptr)


class NativeObject:
    """Owns one C object: explicit, idempotent close(); a context manager; a
    finalizer as the backstop for objects nobody closed.

    One call at a time: _enter() marks the object in use by this thread.
    Another thread's call meanwhile raises BusyError (or, with wait=True, waits:
    the model's short queries); a call from inside the running one (a callback)
    raises BusyError, as does closing it from there. close() from another
    thread first asks the running call to stop (_interrupt), then waits for it."""

    _ptr = None
    _kind = "object"  # for messages: "the model is closed"
    _user = None      # the thread inside a call, or None

    def _own(self, ptr, free, *keep_alive) -> None:
        self._lock = threading.Lock()
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, _free, free, ptr, keep_alive)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _busy(self, what: str) -> errors.BusyError:
        if self._user == threading.get_ident():
            return errors.BusyError(f"cannot {what} the {self._kind} from inside its own call (a callback of it)",
                                    lib.PYMOE_ESTATE)
        return errors.BusyError(f"the {self._kind} is in use by another thread: use it from one thread at a time, "
                                f"or give each thread its own", lib.PYMOE_ESTATE)

    def _enter(self, wait: bool = False):
        """Start a call: the C pointer, with the object marked in use until _leave()."""
        if self._user == threading.get_ident() or not self._lock.acquire(wait):
            raise self._busy("use")
        if self._ptr is None:
            self._lock.release()
            raise errors.ClosedError(f"the {self._kind} is closed", lib.PYMOE_ESTATE)
        self._user = threading.get_ident()
        return self._ptr

    def _leave(self) -> None:
        self._user = None
        self._lock.release()

    def _check_closable(self) -> None:
        """Raise BusyError if this thread is inside a call of this object (or of one that close() would close)."""
        if self._user == threading.get_ident():
            raise self._busy("close")

    def close(self) -> None:
        """Free the C object now (idempotent). From another thread than a running call, stop that call and wait for it."""
        if self._ptr is None:
            return
        self._check_closable()
        self._interrupt()
        with self._lock:
            if self._ptr is None:
                return
            self._before_close()
            self._ptr = None
            self._finalizer()

    def _interrupt(self) -> None:
        """Ask a running call of another thread to stop early (where the C library can)."""

    def _before_close(self) -> None:
        """What must happen while the C object still exists (the lock is held)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _call(self, wait: bool = False):
        """with self._call() as ptr: one guarded call (_enter ... _leave)."""
        ptr = self._enter(wait)
        try:
            yield ptr
        finally:
            self._leave()

    def _handle(self):
        """The C pointer, unguarded (ClosedError once closed): for the caller that holds _enter."""
        if self._ptr is None:
            raise errors.ClosedError(f"the {self._kind} is closed", lib.PYMOE_ESTATE)
        return self._ptr
