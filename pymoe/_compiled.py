"""The compiled cffi module (ffi, lib), with a clear message when it is missing."""
try:
    from ._pymoe_cffi import ffi, lib  # noqa: F401
except ImportError as exc:  # running from a source tree that was never built
    raise ImportError(
        "pymoe's compiled part is missing. Install the package (`pip install .` or "
        "`make build`) and run from outside the source tree.") from exc
