"""Build of fastattn's Cython extensions.

One table of extensions, one set of Cython directives, OpenMP flags chosen per compiler with
a loud fallback to a serial build.  No -march flag: SIMD paths are picked at run time.
Environment switches:
  FASTATTN_DEBUG=1     turn Cython's bounds/wraparound checks back on
  FASTATTN_SANITIZE=1  build with AddressSanitizer (-fsanitize=address)
  FASTATTN_NO_OPENMP=1 build without OpenMP
"""
import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTATTN_DEBUG") == "1"
SANITIZE = os.environ.get("FASTATTN_SANITIZE") == "1"

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "nonecheck": False,
    "embedsignature": True,
}

EXTENSIONS = [
    # (module name, sources)
    ("fastattn._kernel", ["src/fastattn/_kernel.pyx"]),
    ("fastattn._fused", ["src/fastattn/_fused.pyx"]),
]


def _compiler():
    return os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"


def openmp_flags():
    """(compile, link) flags for OpenMP, or ([], []) with a warning when the compiler has none."""
    if os.environ.get("FASTATTN_NO_OPENMP") == "1":
        return [], []
    candidates = [(["-fopenmp"], ["-fopenmp"])]
    if sys.platform == "darwin":
        candidates.insert(0, (["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
    src = textwrap.dedent("""
        #include <omp.h>
        int main(void) { int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return omp_get_max_threads() > 0 ? 0 : 1; }
    """)
    with tempfile.TemporaryDirectory() as tmp:
        c = os.path.join(tmp, "t.c")
        with open(c, "w") as f:
            f.write(src)
        for cflags, lflags in candidates:
            cmd = _compiler().split() + cflags + [c, "-o", os.path.join(tmp, "t")] + lflags
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return cflags, lflags
    print("*" * 72 + "\nfastattn: the C compiler has no OpenMP; building a SERIAL kernel "
          "(num_threads will be ignored).\n" + "*" * 72, file=sys.stderr)
    return [], []


def extensions():
    omp_c, omp_l = openmp_flags()
    cflags = ["-O3", "-fno-math-errno"] + omp_c
    lflags = list(omp_l)
    if SANITIZE:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
        lflags += ["-fsanitize=address"]
    exts = [
        Extension(
            name,
            sources,
            include_dirs=[np.get_include(), "src/fastattn"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION")],
            extra_compile_args=cflags,
            extra_link_args=lflags,
            libraries=["dl"] if sys.platform.startswith("linux") else [],
        )
        for name, sources in EXTENSIONS
    ]
    return cythonize(exts, compiler_directives=DIRECTIVES)


setup(ext_modules=extensions())
