#!/usr/bin/env bash
# AddressSanitizer run: build fastattn's extension with FASTATTN_SANITIZE=1 into a separate
# folder (a copy of the sources; the normal in-place build is not touched) and run the test
# suite against it with libasan preloaded.  Any ASan report aborts the run and fails.
#
#   .ci/asan.sh                  # the default test selection (-m "not slow")
#   .ci/asan.sh -m "" tests/     # everything; arguments go to pytest
#   .ci/asan.sh --self-test      # prove that a deliberate heap error fails this script
#
# ASAN_BUILD_DIR chooses the build folder (default: build/asan under the repository).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${ASAN_BUILD_DIR:-$root/build/asan}
python=${PYTHON:-python}

libasan=$(gcc -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
    echo "asan.sh: gcc has no libasan.so ($libasan)" >&2
    exit 2
fi

echo "+ building the sanitized extension in $build"
rm -rf "$build"
mkdir -p "$build"
cp -r "$root/src" "$root/setup.py" "$root/pyproject.toml" "$build/"
find "$build/src" \( -name '*.so' -o -name '_kernel.c' -o -name '__pycache__' \) -prune \
    -exec rm -rf {} +
(cd "$build" && FASTATTN_SANITIZE=1 "$python" setup.py -q build_ext --inplace \
    --build-temp "$build/tmp") >"$build/build.log" 2>&1 || { cat "$build/build.log"; exit 1; }
so=$(ls "$build"/src/fastattn/_kernel*.so)
if [ "$(nm -D "$so" | grep -c __asan_)" -eq 0 ]; then  # not grep -q: SIGPIPE under pipefail
    echo "asan.sh: $so is not instrumented" >&2
    exit 1
fi

export LD_PRELOAD="$libasan"
export PYTHONMALLOC=malloc
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
export FASTATTN_UNDER_ASAN=1      # the tests that measure RSS skip (ASan's quarantine grows it)
export PYTHONPATH="$build/src${PYTHONPATH:+:$PYTHONPATH}"

# the sanitized build must be the one imported
"$python" - "$build" <<'PY'
import sys, fastattn, fastattn._kernel as k
assert k.__file__.startswith(sys.argv[1]), f"imported {k.__file__}, not the ASan build"
print("+ fastattn from", k.__file__)
PY

if [ "${1:-}" = "--self-test" ]; then
    # a heap-use-after-free through ctypes: ASan must report it and the run must fail
    set +e
    "$python" -c "
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(64)
libc.free(p)
print(ctypes.string_at(p, 8))
" 2>"$build/selftest.log"
    rc=$?
    set -e
    if [ $rc -ne 0 ] && grep -q "ERROR: AddressSanitizer" "$build/selftest.log"; then
        echo "asan.sh self-test: the deliberate error was reported and failed (exit $rc): OK"
        exit 0
    fi
    echo "asan.sh self-test: the deliberate error was NOT caught (exit $rc)" >&2
    exit 1
fi

cd "$root"
if [ $# -eq 0 ]; then
    set -- -m "not slow" tests
fi
echo "+ pytest $* (under AddressSanitizer)"
exec "$python" -m pytest -q -p no:cacheprovider "$@"
