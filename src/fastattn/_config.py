"""fastattn.show_config: what this build runs on."""
from . import _kernel
from ._threads import BLAS_CONTROL, BLAS_PATH, get_num_threads

SIMD = _kernel.simd_init(True)


def show_config(print_=True):
    """Report the SIMD path in use, what computes the tiles, the BLAS library, OpenMP and the
    thread count.

    Prints the report (unless ``print_=False``) and returns it as a dict."""
    import numpy
    import scipy
    info = {
        "fastattn": __import__("fastattn").__version__,
        "simd": SIMD,
        "tiles": ("micro-kernel" if _kernel.micro_kernel_enabled() else "BLAS")
        + " (Q·Kᵀ and P·V)",
        "openmp": _kernel.openmp_enabled(),
        "num_threads": get_num_threads(),
        "blas": BLAS_PATH or "unknown",
        "blas_threads": _kernel.blas_get_global(),
        "blas_thread_control": "held at 1 while a kernel calls it" if BLAS_CONTROL else "unavailable",
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    if print_:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}} : {v}")
    return info
