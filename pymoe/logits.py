"""Read-only numpy views of a session's logits that refuse to be used once
they are stale.

llama.cpp's logits are overwritten (or reallocated) by the session's next
feed, and freed with it: a view reads a copy the session made when it was
taken, in memory that lives as long as any view of it (numpy's base chain),
so that nothing can read freed memory. The session's next feed, rewind,
reset, state load and close end a view's life. Every ndarray method, attribute, indexing, ufunc and numpy function on a
view checks first and raises StaleLogitsError after that point. Copies
(view.copy(), np.array(view), arithmetic results) are ordinary arrays and stay
valid. What escapes the check (and then reads the old logits: the memory
stays valid): np.asarray(view) (an ordinary ndarray over the same memory),
the aliases flat/base/data/ctypes once taken, and, before Python 3.12, the
buffer protocol (memoryview(view), bytes(view)).
"""
from __future__ import annotations

import sys

import numpy as np

from .errors import InvalidArgumentError, StaleLogitsError


class LogitsView(np.ndarray):
    _owner = None  # the Session; its _logits_epoch moves on when the memory changes
    _logits_epoch = -1

    def __array_finalize__(self, obj):
        self._owner = getattr(obj, "_owner", None)
        self._logits_epoch = getattr(obj, "_logits_epoch", -1)

    def _check(self) -> None:
        owner = self._owner
        if owner is not None and owner._logits_epoch != self._logits_epoch:
            raise StaleLogitsError(
                "these logits are stale: the session was fed, rewound, reset or closed after they were "
                "taken; take new ones, or .copy() the ones you want to keep")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = []
        for x in inputs:
            if isinstance(x, LogitsView):
                x._check()
                x = x.view(np.ndarray)
            plain.append(x)
        if any(isinstance(o, LogitsView) for o in kwargs.get("out", ())):
            raise ValueError("logits views are read-only")
        return getattr(ufunc, method)(*plain, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        self._check()
        args = tuple(a.view(np.ndarray) if isinstance(a, LogitsView) else a for a in args)
        return func(*args, **kwargs)


def _view_method(name):
    """Methods that may return a view: keep the check on the result if they did."""
    base = getattr(np.ndarray, name)

    def method(self, *args, **kwargs):
        self._check()
        result = base(self, *args, **kwargs)
        if isinstance(result, LogitsView) and not np.may_share_memory(result, self):
            result = result.view(np.ndarray)  # fancy indexing copied: an ordinary array
        return result

    method.__name__ = name
    return method


def _copy_method(name):
    """Methods whose results do not alias the logits: run them on a plain view."""
    base = getattr(np.ndarray, name)

    def method(self, *args, **kwargs):
        self._check()
        return base(self.view(np.ndarray), *args, **kwargs)

    method.__name__ = name
    return method


_VIEW_METHODS = {"__getitem__", "reshape", "ravel", "view", "transpose", "squeeze", "swapaxes", "diagonal"}
_DUNDER_COPY_METHODS = {"__repr__", "__str__", "__format__", "__iter__", "__reduce__", "__reduce_ex__",
                        "__copy__", "__deepcopy__", "__bool__", "__float__", "__int__", "__index__",
                        "__contains__", "__array__"}
for _name in dir(np.ndarray):
    if _name in _VIEW_METHODS:
        setattr(LogitsView, _name, _view_method(_name))
    elif _name in _DUNDER_COPY_METHODS or (not _name.startswith("_") and callable(getattr(np.ndarray, _name))):
        setattr(LogitsView, _name, _copy_method(_name))


def _checked_attribute(name):
    """Attributes that alias the memory (flat, base, data, ctypes, the array
    interfaces) or are views of it (T, mT, real): checked when taken."""
    base = getattr(np.ndarray, name)

    def get(self):
        self._check()
        return base.__get__(self)

    return property(get, doc=f"ndarray.{name}, after the staleness check")


for _name in ("flat", "base", "data", "ctypes", "__array_interface__", "__array_struct__", "T", "mT", "real", "imag"):
    setattr(LogitsView, _name, _checked_attribute(_name))

if sys.version_info >= (3, 12):  # the buffer protocol (memoryview, bytes) is overridable from Python only since 3.12
    def _buffer(self, flags):
        self._check()
        return np.ndarray.__buffer__(self, flags)

    LogitsView.__buffer__ = _buffer


class _LogitsMemory(np.ndarray):
    """The array under every view, of its own type: numpy then keeps the view in the
    base chain of np.asarray(view), and SamplingParams can check a plain alias too."""


def make_view(owner, memory: np.ndarray, shape) -> LogitsView:
    """A checked view of memory (float32, owned by the caller's copy) as logits of shape."""
    arr = memory.view(_LogitsMemory).reshape(shape)
    arr.flags.writeable = False
    view = arr.view(LogitsView)
    view._owner = owner
    view._logits_epoch = owner._logits_epoch
    return view


def c_row(logits) -> np.ndarray:
    """logits as a contiguous float32 row for C; a stale LogitsView raises (the C call would read freed memory)."""
    view = logits
    while isinstance(view, np.ndarray):  # the view itself, or np.asarray(view) and other plain views of it
        if isinstance(view, LogitsView):
            view._check()
            break
        view = np.ndarray.base.__get__(view)
    row = np.ascontiguousarray(logits, dtype=np.float32)
    if row.ndim != 1 or row.size == 0:
        raise InvalidArgumentError("logits must be a non-empty 1-D array")
    return row
