"""Generate the C source of the cffi extension module pymoe._pymoe_cffi.

The declarations come from pymoe.h itself (the part between the CDEF markers),
so the binding cannot drift from the header. Run by CMake at build time:
    python gen_cffi_module.py path/to/pymoe.h out.c
"""
import re
import sys

import cffi

# Python functions that C calls back into (defined in pymoe/_native.py and pymoe/speculative.py)
CALLBACKS = """
extern "Python" void _pymoe_on_log(int32_t level, int32_t source, const char * line, void * user_data);
extern "Python" bool _pymoe_on_progress(float fraction, void * user_data);
extern "Python" void _pymoe_on_round(const struct pymoe_spec_round * round, void * user_data);
"""


def cdef_from_header(text: str) -> str:
    # from the end of the comment holding BEGIN to the start of the one holding END
    match = re.search(r"PYMOE_CDEF_BEGIN.*?\*/(.*?)/\*\s*PYMOE_CDEF_END", text, re.S)
    if not match:
        raise SystemExit("pymoe.h has no PYMOE_CDEF_BEGIN ... PYMOE_CDEF_END section")
    body = match.group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)        # comments
    body = re.sub(r"\bPYMOE_API\b", "", body)
    # function-like macros are C callers' shorthands (*_default): Python calls what they expand to
    body = re.sub(r"^[ \t]*#[ \t]*define[ \t]+\w+\([^)]*\).*$", "", body, flags=re.M)
    if re.search(r"^\s*#", body, re.M):
        raise SystemExit("pymoe.h: preprocessor directives inside the CDEF section")
    return body


def main() -> None:
    header, out = sys.argv[1], sys.argv[2]
    with open(header, encoding="utf-8") as f:
        cdef = cdef_from_header(f.read())
    ffi = cffi.FFI()
    ffi.cdef(cdef + CALLBACKS)
    ffi.set_source("pymoe._pymoe_cffi", '#include "pymoe.h"')
    ffi.emit_c_code(out)


if __name__ == "__main__":
    main()
