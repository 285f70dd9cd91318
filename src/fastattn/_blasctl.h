/* Thread control of the BLAS library behind scipy.linalg.cython_blas.
 *
 * fastattn calls tile GEMMs from its own OpenMP threads, so the BLAS must not start threads
 * of its own inside them.  The library is found from the address of the gemm symbol SciPy
 * hands out (dladdr), and its OpenBLAS entry points are looked up by name (SciPy's wheels
 * prefix them with scipy_).  The count is global in OpenBLAS's pthreads builds (what SciPy
 * ships; there openblas_set_num_threads_local also sets the global count), so the Python side
 * (_threads.blas_guard) holds it at one, counted across concurrent callers, while kernels run.
 */
#ifndef FASTATTN_BLASCTL_H
#define FASTATTN_BLASCTL_H

#include <stddef.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define FA_HAVE_DL 1
#endif

typedef void (*fa_void_int_t)(int);
typedef int (*fa_int_void_t)(void);

static fa_void_int_t fa_blas_global_set = NULL; /* openblas_set_num_threads */
static fa_int_void_t fa_blas_global_get = NULL; /* openblas_get_num_threads */
static char fa_blas_path[4096];

#ifdef FA_HAVE_DL
static void *fa_blas_sym(void *h, const char *const *names) {
    for (; *names; names++) {
        void *p = dlsym(h, *names);
        if (p) return p;
    }
    return NULL;
}
#endif

/* Returns the BLAS library's path, or NULL when it cannot be told. */
static const char *fa_blas_init(void *gemm_symbol) {
#ifdef FA_HAVE_DL
    Dl_info info;
    if (!gemm_symbol || !dladdr(gemm_symbol, &info) || !info.dli_fname) return NULL;
    size_t i = 0;
    for (; info.dli_fname[i] && i + 1 < sizeof fa_blas_path; i++) fa_blas_path[i] = info.dli_fname[i];
    fa_blas_path[i] = 0;
    void *h = dlopen(fa_blas_path, RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return fa_blas_path;
    /* SciPy's pointer is a wrapper in cython_blas; name the library that holds sgemm itself
     * (dlsym on a handle searches that library's dependencies too) */
    static const char *const gemm_names[] = {"scipy_sgemm_", "sgemm_", "scipy_sgemm", "sgemm", NULL};
    void *g = fa_blas_sym(h, gemm_names);
    if (g && dladdr(g, &info) && info.dli_fname) {
        for (i = 0; info.dli_fname[i] && i + 1 < sizeof fa_blas_path; i++) fa_blas_path[i] = info.dli_fname[i];
        fa_blas_path[i] = 0;
    }
    static const char *const set_names[] = {
        "scipy_openblas_set_num_threads", "openblas_set_num_threads",
        "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", NULL};
    static const char *const get_names[] = {
        "scipy_openblas_get_num_threads", "openblas_get_num_threads",
        "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", NULL};
    fa_blas_global_set = (fa_void_int_t)fa_blas_sym(h, set_names);
    fa_blas_global_get = (fa_int_void_t)fa_blas_sym(h, get_names);
    dlclose(h);  /* RTLD_NOLOAD took a reference on a library SciPy keeps loaded */
    return fa_blas_path;
#else
    (void)gemm_symbol;
    return NULL;
#endif
}

static inline int fa_blas_get_global(void) { return fa_blas_global_get ? fa_blas_global_get() : -1; }

static inline int fa_blas_set_global(int n) {
    int prev = fa_blas_get_global();
    if (fa_blas_global_set && n >= 1) fa_blas_global_set(n);
    return prev;
}

#endif  /* FASTATTN_BLASCTL_H */
