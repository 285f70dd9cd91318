"""fastattn.show_config: what this build runs on."""
from . import _kernel
from ._threads import BLAS_PATH, _HAS_LOCAL, get_num_threads

SIMD = _kernel.simd_init(True)


def show_config(print_=True):
    """Report the SIMD path in use, the BLAS library, OpenMP and the thread count.

    Prints the report (unless ``print_=False``) and returns it as a dict."""
    import numpy
    import scipy
    info = {
        "fastattn": __import__("fastattn").__version__,
        "simd": SIMD,
        "openmp": _kernel.openmp_enabled(),
        "num_threads": get_num_threads(),
        "blas": BLAS_PATH or "unknown",
        "blas_thread_control": "per-thread (openblas_set_num_threads_local)" if _HAS_LOCAL
        else ("global, held at 1 during kernels" if _kernel.blas_get_global() > 0 else "none"),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    if print_:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}} : {v}")
    return info
