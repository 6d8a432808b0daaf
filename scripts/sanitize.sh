#!/usr/bin/env bash
# Run a command (the test suite) against the ASan + UBSan build of pymoe in
# build/sanitize (make sanitize builds it). Python itself is not instrumented,
# so libasan is preloaded, with libstdc++ beside it: with libasan alone every
# C++ exception aborts in its __cxa_throw interceptor.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
site="$here/build/sanitize/site"
[ -d "$site/pymoe" ] || { echo "sanitize.sh: no sanitizer build in $site (run make sanitize)" >&2; exit 2; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)"
# detect_leaks=0: CPython frees little at exit (pymoe's own leaks are checked by tests, RSS and fds);
# allocator_may_return_null=1: a refused huge allocation is NULL, as with glibc, not an ASan abort
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYMOE_SANITIZE=1  # tests skip what ASan changes (it makes mlock a no-op)
exec "$@"
