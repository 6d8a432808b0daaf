"""The binding in use: the one status check, the C -> Python callbacks of the log and of
load progress, and NativeObject (the lifetime of every C object)."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
import weakref
from typing import Optional

from . import errors
from ._compiled import ffi, lib

logger = logging.getLogger("pymoe")
logger.addHandler(logging.NullHandler())  # silent unless the application configures logging
llama_logger = logging.getLogger("pymoe.llama")

_LEVELS = {lib.PYMOE_LOG_DEBUG: logging.DEBUG, lib.PYMOE_LOG_INFO: logging.INFO,
           lib.PYMOE_LOG_WARN: logging.WARNING, lib.PYMOE_LOG_ERROR: logging.ERROR}


# Ctrl-C that arrived while Python ran a callback from C (llama.cpp logs a lot while it loads): cffi cannot pass
# it up through the C frames, so the callback's error hook keeps it here and stops the call (pymoe_interrupt).
# The call raises it once it has returned, whether it stopped (PYMOE_EABORTED) or could not (status 0).
_interrupted: list = []


def params_struct(name: str):
    """A new struct `name` (pymoe_model_params, ...) holding the library's defaults, its size set (pymoe.h,
    Conventions: *_default() is a C macro over *_init)."""
    ptr = ffi.new(f"struct {name} *")
    getattr(lib, f"{name}_init")(ptr, ffi.sizeof(f"struct {name}"))
    return ptr


def raise_for(rc: int, detail: Optional[str] = None) -> None:
    """Raise the typed exception for a non-zero status, with the library's detail
    (this thread's, unless the call ran on another thread that passed it on),
    or the Ctrl-C a callback kept (the only thing raised for status 0)."""
    if _interrupted and rc in (0, lib.PYMOE_EABORTED):
        raise _interrupted.pop()
    if rc == 0:
        return
    if detail is None:
        detail = ffi.string(lib.pymoe_last_error()).decode("utf-8", "replace")
    if not detail:
        detail = ffi.string(lib.pymoe_strerror(rc)).decode()
    raise errors.BY_CODE.get(rc, errors.PymoeError)(detail, rc)


def check(rc: int) -> None:
    if rc != 0 or _interrupted:
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
    """Before a long C call: Ctrl-C stops it (the C library's SIGINT handler goes first, then Python's);
    one a callback kept since is raised now."""
    if _interrupted:
        raise _interrupted.pop()
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


# -- rpc-servers ------------------------------------------------------------------
# llama.cpp's RPC client runs on threads of its own. When it loses its server it cannot go on: the C library
# parks its thread (rpc.c) and the call waiting on it never returns. So a call on a model with rpc-servers runs
# on a helper thread, and the caller gives up on it when pymoe_rpc_failures() moves: a BackendError, and the
# model, its sessions and loops are abandoned (their memory is not freed: that would wait on the server too).
_acting = threading.local()  # on a helper thread: the thread it runs a call for


def _me() -> int:
    """This thread, or the one a helper thread is running a call for (callbacks then count as that thread's)."""
    return getattr(_acting, "ident", None) or threading.get_ident()


def rpc_lost_error() -> errors.BackendError:
    cause = ffi.string(lib.pymoe_rpc_failure()).decode("utf-8", "replace").rsplit("/", 1)[-1]  # no build path
    return errors.BackendError(
        f"the connection to an rpc-server was lost (llama.cpp: {cause.strip()}); what was loaded with rpc-servers "
        f"cannot be used or freed any more: load the model again", lib.PYMOE_EBACKEND)


def call_remote(fn, *args):
    """fn(*args), a C call that may wait on an rpc-server, run on a helper thread. Returns (its result, the
    library's detail when the result is a non-zero status); BackendError when a server is lost meanwhile."""
    failures = lib.pymoe_rpc_failures()
    caller, box = _me(), {}

    def run():
        _acting.ident = caller
        try:
            result = fn(*args)
            box["result"] = result
            box["detail"] = ffi.string(lib.pymoe_last_error()).decode("utf-8", "replace") if result else None
        except BaseException as exc:  # noqa: BLE001 - raised by the caller
            box["error"] = exc

    helper = threading.Thread(target=run, name="pymoe-rpc-call", daemon=True)
    helper.start()
    interrupted = None
    while helper.is_alive():
        try:
            helper.join(0.05)
        except KeyboardInterrupt as exc:  # the call stops at its next check (pymoe_interrupt): wait for it
            interrupted = exc
        if helper.is_alive() and lib.pymoe_rpc_failures() != failures:
            raise rpc_lost_error()
    if interrupted is not None:
        raise interrupted
    if "error" in box:
        raise box["error"]
    return box["result"], box["detail"]


def run_c(fn, *args, remote: bool = False):
    """fn(*args), a C call returning a status: (status, detail), made here, or for an object on rpc-servers
    on a helper thread (call_remote)."""
    return call_remote(fn, *args) if remote else (fn(*args), None)


def _free(free, ptr, keep_alive, remote) -> None:
    """A finalizer's work. keep_alive (the objects this one's C object points
    into: a session's model, a loop's sessions) is held by the finalizer until
    it has run, so the cycle collector cannot free them first. An object on a
    lost rpc-server is left as it is (freeing it would wait on the server)."""
    if remote is None:
        free(ptr)
    elif lib.pymoe_rpc_failures() == remote:
        try:
            call_remote(free, ptr)
        except errors.BackendError:
            pass  # lost while freeing: left as it is, like the rest
        except RuntimeError:  # no new threads at interpreter shutdown
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
    _remote = None    # on rpc-servers: pymoe_rpc_failures() when it was made (a change: a server was lost)

    def _own(self, ptr, free, *keep_alive) -> None:
        self._lock = threading.Lock()
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, _free, free, ptr, keep_alive, self._remote)

    @contextlib.contextmanager
    def _building(self, out, free):
        """Around a constructor's C call (which writes out[0]) and the rest of __init__: whatever is raised
        there, a Ctrl-C that Python raises just as the call returns included, frees what the call made at once,
        owned by now or not yet (nothing else could: the caller never gets the object)."""
        try:
            yield
        except BaseException:
            if self._ptr is not None:
                self.close()
            elif out[0] != ffi.NULL:
                _free(free, out[0], (), self._remote)
            raise

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _busy(self, what: str) -> errors.BusyError:
        if self._user == _me():
            return errors.BusyError(f"cannot {what} the {self._kind} from inside its own call (a callback of it)",
                                    lib.PYMOE_ESTATE)
        return errors.BusyError(f"the {self._kind} is in use by another thread: use it from one thread at a time, "
                                f"or give each thread its own", lib.PYMOE_ESTATE)

    def _enter(self, wait: bool = False):
        """Start a call: the C pointer, with the object marked in use until _leave()."""
        me = getattr(_acting, "ident", None) or threading.get_ident()  # _me(), inlined: once per token
        if self._user == me or not self._lock.acquire(wait):
            raise self._busy("use")
        if self._ptr is None or (self._remote is not None and lib.pymoe_rpc_failures() != self._remote):
            self._lock.release()
            if self._ptr is not None:
                raise rpc_lost_error()
            raise errors.ClosedError(f"the {self._kind} is closed", lib.PYMOE_ESTATE)
        self._user = me
        return self._ptr

    def _leave(self) -> None:
        self._user = None
        self._lock.release()

    def _check_closable(self) -> None:
        """Raise BusyError if this thread is inside a call of this object (or of one that close() would close)."""
        if self._user == _me():
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
            self._finalizer()  # a lost rpc-server's object is left as it is (see _free)

    def _interrupt(self) -> None:
        """Ask a running call of another thread to stop early (where the C library can)."""

    def _before_close(self) -> None:
        """What must happen while the C object still exists (the lock is held)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _save_bytes(self, save, ptr) -> bytearray:
        """save(ptr, buf, capacity, &size), a C state save, into a bytearray of its size: the one copy."""
        out = bytearray(self._save_size(save, ptr))
        self._run(save, ptr, ffi.from_buffer("uint8_t[]", out), len(out), ffi.new("size_t *"))
        return out

    def _save_size(self, save, ptr) -> int:
        """save(ptr, NULL, 0, &size): the bytes a state save would write, without writing them."""
        size = ffi.new("size_t *")
        self._run(save, ptr, ffi.NULL, 0, size)
        return size[0]

    def _saved_size(self, save) -> int:
        with self._call() as ptr:
            return self._save_size(save, ptr)

    def _tokens_from(self, fn) -> list:
        """fn(ptr, &tokens, &n), a C call that points at the object's tokens: a copy of them, made in the call."""
        tokens, n = ffi.new("const pymoe_token **"), ffi.new("int32_t *")
        with self._call() as ptr:
            self._run(fn, ptr, tokens, n)
            return ffi.unpack(tokens[0], n[0])

    @staticmethod
    def _bytes_in(state):
        """(pointer, size) of a bytes-like state for a C load."""
        try:
            view = memoryview(state)
        except TypeError:
            raise errors.InvalidArgumentError(f"a saved state is bytes-like, got {type(state).__name__}",
                                              lib.PYMOE_EINVAL) from None
        return ffi.from_buffer("uint8_t[]", view), view.nbytes

    # -- the one way into C -------------------------------------------------
    # _c(fn, *args): one call of fn(pointer, *args) on this object, from start to raise. For a few calls
    # that must see the same state (a size, then the bytes), `with self._call() as ptr:` and _run for each.
    # The per-token paths (Session.feed of one token, Session.sample, Speculative.step) spell _c out inline,
    # for speed, and raise through the same _raise_for.

    def _c(self, fn, *args, moves: bool = False, long: bool = False) -> None:
        """fn(this object's pointer, *args), a C call returning a status: the
        object marked in use by this thread (BusyError, ClosedError), the
        views of its logits gone stale first when the call changes them
        (moves), Ctrl-C able to stop a long call, a helper thread for objects
        on rpc-servers, and the status, an error a callback kept or a Ctrl-C
        raised as the typed error."""
        with self._call() as ptr:
            if moves:
                self._logits_moved()
            if long:
                interrupt_on_ctrl_c()
            self._run(fn, ptr, *args)

    def _run(self, fn, *args) -> None:
        """fn(*args) inside a call of this object (_call held): on a helper thread for rpc-servers, the status
        raised as the typed error."""
        rc, detail = run_c(fn, *args, remote=self._remote is not None)
        self._status(rc, detail)

    def _status(self, rc: int, detail=None) -> None:
        """Raise what a call of this object left, if anything (the status, a callback's error, Ctrl-C)."""
        if rc or _interrupted or self._callback_failed():
            self._raise_for(rc, detail)

    def _logits_moved(self) -> None:
        """The memory logits views read is about to change: they go stale (sessions, loops)."""

    def _callback_failed(self) -> bool:
        """A callback of this object's raised during the call (its error is raised by _raise_for)."""
        return False

    def _raise_for(self, rc: int, detail=None) -> None:
        """Raise what the call left: a callback's error, Ctrl-C, the status as its typed error."""
        raise_for(rc, detail)

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
