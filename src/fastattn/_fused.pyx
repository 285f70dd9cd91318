# Fused passes of fastattn's transformer blocks (_blocks.py): the projection GEMM split across
# fastattn's OpenMP threads with its bias + activation applied per chunk, and the
# residual + LayerNorm row pass.
#
# One thread pool: every parallel region here runs on fastattn's OpenMP threads, and the
# BLAS behind scipy.linalg.cython_blas is held to one thread while they run (the caller holds
# fastattn._threads.blas_guard: OpenBLAS's count is global in SciPy's pthreads builds), so a
# projection never starts OpenBLAS workers that would then spin against the attention
# kernel's threads.
#
#   linear:  out (N x M) [+]= act(x (N x K) · wᵀ + b)       w is (M x K), PyTorch's layout
#            the N rows (or, for few rows, the M columns) are cut into one chunk per thread;
#            a thread multiplies its chunk (float32 calls of up to 8 rows stream w once, up
#            to 256 rows run the micro-kernel of _gemm.h, larger ones sgemm/dgemm), then
#            runs the bias + activation pass on the same chunk while it is still in cache.
#   add_layernorm:  h = x + y;  o = (h - mean(h)) / sqrt(var(h) + eps) * gamma + beta
#            one pass per row (rows split across threads), h optionally kept (pre-norm).
#
# Validation of shapes, dtypes and strides is done here too (these are reachable from Python),
# so no input can make the nogil code read or write out of bounds.

# cython: language_level=3

from cython.parallel cimport prange
from libc.string cimport memset
from libc.math cimport erf, tanh, sqrt, INFINITY
from scipy.linalg.cython_blas cimport sgemm, dgemm
cimport numpy as cnp
import numpy as np

cnp.import_array()

ctypedef fused floating:
    float
    double

cdef extern from "_blasctl.h" nogil:
    const char *fa_blas_init(void *gemm_symbol)

cdef extern from *:
    """
    #include <math.h>
    #include <stddef.h>
    #include <stdlib.h>
    #include "_vecmath.h"          /* FA_AVX2, fa_exp8, fa_hsum8 (x86-64) */
    #include "_gemm.h"             /* fa_pack_t_f32, fa_gemm_f32: the tiles' micro-kernel */
    #ifdef FA_HAVE_X86
    #define FF_X86 1
    #else
    #define FF_X86 0
    #endif

    enum { FF_NONE = 0, FF_RELU = 1, FF_GELU = 2, FF_GELU_TANH = 3 };

    static int ff_avx2 = 0;

    static const char *ff_simd_init(int use_simd) {
    #if FF_X86
        __builtin_cpu_init();
        ff_avx2 = use_simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    #else
        (void)use_simd;
        ff_avx2 = 0;
    #endif
        return ff_avx2 ? "avx2+fma" : "scalar";
    }

    /* erf(x) = x P(x²) / Q(x²) on |x| <= 4, clamped to [-1, 1] (|erf(4)| rounds to 1 in
     * float32).  Coefficients fitted for fastattn (rational least squares with Lawson
     * reweighting); max abs error 2e-8 in exact arithmetic, <= 4e-7 evaluated in float32. */
    #define FF_P0 1.128378976e+00f
    #define FF_P1 1.962492421e-01f
    #define FF_P2 5.346751452e-02f
    #define FF_P3 4.003658494e-03f
    #define FF_P4 2.880419306e-04f
    #define FF_P5 1.974830247e-06f
    #define FF_Q1 5.072525211e-01f
    #define FF_Q2 1.164765375e-01f
    #define FF_Q3 1.544444570e-02f
    #define FF_Q4 1.216363468e-03f
    #define FF_Q5 3.748089240e-05f
    #define FF_SQRT1_2 0.70710678118654752440f
    #define FF_SQRT2_PI 0.79788456080286535588f

    static inline float ff_erf_f32(float x) {
        float c = x > 4.0f ? 4.0f : (x < -4.0f ? -4.0f : x);     /* NaN stays NaN */
        float z = c * c;
        float p = ((((FF_P5 * z + FF_P4) * z + FF_P3) * z + FF_P2) * z + FF_P1) * z + FF_P0;
        float q = ((((FF_Q5 * z + FF_Q4) * z + FF_Q3) * z + FF_Q2) * z + FF_Q1) * z + 1.0f;
        float r = c * p / q;
        if (x >= 4.0f) return 1.0f;
        if (x <= -4.0f) return -1.0f;
        return r > 1.0f ? 1.0f : (r < -1.0f ? -1.0f : r);
    }

    static inline float ff_act_f32(float v, int act) {
        switch (act) {
        case FF_RELU: return v > 0.0f ? v : (v == v ? 0.0f : v);
        case FF_GELU: return 0.5f * v * (1.0f + ff_erf_f32(v * FF_SQRT1_2));
        case FF_GELU_TANH: {
            /* 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)); past exp's range tanh(u) is -1 in
             * float32 and the result 0 (v * 0: -0, and NaN for v = -inf, as 0.5 v (1 + -1)) */
            float u = FF_SQRT2_PI * (v + 0.044715f * v * v * v);
            float e = -2.0f * u;
            return e > 88.0f ? v * 0.0f : v / (1.0f + expf(e));
        }
        default: return v;
        }
    }

    static inline double ff_act_f64(double v, int act) {
        switch (act) {
        case FF_RELU: return v > 0.0 ? v : (v == v ? 0.0 : v);
        case FF_GELU: return 0.5 * v * (1.0 + erf(v * 0.70710678118654752440));
        case FF_GELU_TANH:
            return 0.5 * v * (1.0 + tanh(0.79788456080286535588 * (v + 0.044715 * v * v * v)));
        default: return v;
        }
    }

    #if FF_X86

    FA_AVX2 static inline __m256 ff_erf8(__m256 x) {
        __m256 c = _mm256_min_ps(_mm256_set1_ps(4.0f), x);
        c = _mm256_max_ps(_mm256_set1_ps(-4.0f), c);
        __m256 z = _mm256_mul_ps(c, c);
        __m256 p = _mm256_set1_ps(FF_P5), q = _mm256_set1_ps(FF_Q5);
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FF_P4));
        q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(FF_Q4));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FF_P3));
        q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(FF_Q3));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FF_P2));
        q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(FF_Q2));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FF_P1));
        q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(FF_Q1));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(FF_P0));
        q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(1.0f));
        __m256 r = _mm256_div_ps(_mm256_mul_ps(c, p), q);
        r = _mm256_min_ps(_mm256_set1_ps(1.0f), r);
        r = _mm256_max_ps(_mm256_set1_ps(-1.0f), r);
        /* |x| >= 4: exactly ±1 (so gelu of a large negative input is exactly 0) */
        __m256 sat = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x),
                                   _mm256_set1_ps(4.0f), _CMP_GE_OQ);
        __m256 one = _mm256_or_ps(_mm256_and_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(1.0f));
        return _mm256_blendv_ps(r, one, sat);
    }

    FA_AVX2 static inline __m256 ff_act8(__m256 v, int act) {
        switch (act) {
        case FF_RELU:
            return _mm256_max_ps(_mm256_setzero_ps(), v);             /* NaN passes through */
        case FF_GELU: {
            __m256 e = ff_erf8(_mm256_mul_ps(v, _mm256_set1_ps(FF_SQRT1_2)));
            return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v),
                                 _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        }
        case FF_GELU_TANH: {
            __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
            __m256 u = _mm256_mul_ps(_mm256_set1_ps(FF_SQRT2_PI),
                                     _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
            __m256 a = _mm256_mul_ps(_mm256_set1_ps(-2.0f), u);
            __m256 e = fa_exp8(a);                      /* as the plain C twin: 0 past 88 */
            __m256 g = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            __m256 far = _mm256_cmp_ps(a, _mm256_set1_ps(88.0f), _CMP_GT_OQ);
            return _mm256_blendv_ps(g, _mm256_mul_ps(v, _mm256_setzero_ps()), far);
        }
        default:
            return v;
        }
    }

    /* rows x cols block with row stride ld: y = act(y + bias); the tail of each row goes
     * through the same vector code under a mask, so every element takes the same path */
    FA_AVX2 static void ff_bias_act_f32_avx2(float *y, ptrdiff_t rows, ptrdiff_t cols,
                                             ptrdiff_t ld, const float *bias, int act) {
        const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        ptrdiff_t tail = cols % 8, body = cols - tail;
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)tail), idx);
        for (ptrdiff_t i = 0; i < rows; i++) {
            float *row = y + i * ld;
            ptrdiff_t j = 0;
            for (; j < body; j += 8) {
                __m256 v = _mm256_loadu_ps(row + j);
                if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
                _mm256_storeu_ps(row + j, ff_act8(v, act));
            }
            if (tail) {
                __m256 v = _mm256_maskload_ps(row + j, mask);
                if (bias) v = _mm256_add_ps(v, _mm256_maskload_ps(bias + j, mask));
                _mm256_maskstore_ps(row + j, mask, ff_act8(v, act));
            }
        }
    }
    #endif  /* FF_X86 */

    static void ff_bias_act_f32(float *y, ptrdiff_t rows, ptrdiff_t cols, ptrdiff_t ld,
                                const float *bias, int act) {
        if (!bias && act == FF_NONE) return;
    #if FF_X86
        if (ff_avx2) { ff_bias_act_f32_avx2(y, rows, cols, ld, bias, act); return; }
    #endif
        for (ptrdiff_t i = 0; i < rows; i++) {
            float *row = y + i * ld;
            for (ptrdiff_t j = 0; j < cols; j++)
                row[j] = ff_act_f32(bias ? row[j] + bias[j] : row[j], act);
        }
    }

    static void ff_bias_act_f64(double *y, ptrdiff_t rows, ptrdiff_t cols, ptrdiff_t ld,
                                const double *bias, int act) {
        if (!bias && act == FF_NONE) return;
        for (ptrdiff_t i = 0; i < rows; i++) {
            double *row = y + i * ld;
            for (ptrdiff_t j = 0; j < cols; j++)
                row[j] = ff_act_f64(bias ? row[j] + bias[j] : row[j], act);
        }
    }

    /* One row of residual + LayerNorm: t = x + y (y may be NULL); h (if not NULL) := t;
     * o := (t - mean) / sqrt(var + eps) * g + b, with the biased variance of t.
     * Sums in double; x, y, h, o may alias one another element for element. */
    #define FF_ADD_LN(NAME, T)                                                              \\
    static void NAME(const T *x, const T *y, T *h, T *o, const T *g, const T *b,            \\
                     double eps, ptrdiff_t n) {                                             \\
        T *t = h ? h : o;                                                                   \\
        double s = 0, ss = 0;                                                               \\
        ptrdiff_t j;                                                                        \\
        if (n <= 0) return;                                                                 \\
        if (y) {                                                                            \\
            _Pragma("omp simd reduction(+:s)")                                              \\
            for (j = 0; j < n; j++) { T v = x[j] + y[j]; t[j] = v; s += v; }                \\
        } else {                                                                            \\
            _Pragma("omp simd reduction(+:s)")                                              \\
            for (j = 0; j < n; j++) { T v = x[j]; t[j] = v; s += v; }                       \\
        }                                                                                   \\
        T mean = (T)(s / n);                                                                \\
        _Pragma("omp simd reduction(+:ss)")                                                 \\
        for (j = 0; j < n; j++) { T d = t[j] - mean; ss += (double)d * d; }                 \\
        T rstd = (T)(1.0 / sqrt(ss / n + eps));                                             \\
        _Pragma("omp simd")                                                                 \\
        for (j = 0; j < n; j++) o[j] = (t[j] - mean) * rstd * g[j] + b[j];                  \\
    }
    FF_ADD_LN(ff_add_ln_f32, float)
    FF_ADD_LN(ff_add_ln_f64, double)

    /* Few rows (decoding): out (n x m) [+]= x (n x k) · wᵀ streams w once, with the n rows
     * of x staying in cache; OpenBLAS would pack w first (three passes over it).  Memory-bound
     * on w, so one pass is what matters.
     *
     * Two w rows at a time (ff_smalln_pair: each x vector loaded once for both), one from each
     * half of w, so that w is read as two sequential streams far apart: the hardware
     * prefetchers then keep more of it in flight than one stream gets.  A software prefetch of
     * each half's next row keeps the misses going across 4 KiB pages, where the hardware
     * prefetcher stops.  Measured at 1 thread on the 2-core Zen 3, 88 MB of w, GB/s, medians
     * of 9 interleaved calls in one process (n x k: two halves / adjacent pairs / one row at
     * a time, the previous kernel for k <= 1024): 4 x 512: 18.6 / 12.4 / 16.3; 1 x 512:
     * 21.7 / 14.3 / 17.1; 2 x 512: 23.4 / 13.5 / 17.9; 4 x 1024: 19.9 / 17.7 / 15.4;
     * 4 x 2048: 20.5 / 19.2 / 19.3.  (The benchmark's read ceiling at 1 thread: 23-24.) */
    #define FF_SMALL_N 8
    #if FF_X86

    /* [sum(a), sum(b), sum(c), sum(d)] */
    FA_AVX2 static inline __m128 ff_hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    }

    /* rows [0, n) of x against w rows w0 and w1 (w1 may equal w0: an odd row out), while
     * fetching the rows pf floats past each of them (the rows the next call takes) */
    FA_AVX2 static void ff_smalln_pair(ptrdiff_t n, ptrdiff_t k, const float *x, ptrdiff_t ldx,
                                       const float *w0, const float *w1, float *o0, float *o1,
                                       ptrdiff_t ldo, int accumulate, ptrdiff_t pf) {
        const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        ptrdiff_t tail = k % 8, body = k - tail;
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)tail), idx);
        for (ptrdiff_t i0 = 0; i0 < n; i0 += 4) {
            ptrdiff_t ni = n - i0 < 4 ? n - i0 : 4;
            const float *x0 = x + i0 * ldx;
            const float *x1 = x0 + (ni > 1 ? ldx : 0);
            const float *x2 = x0 + (ni > 2 ? 2 * ldx : 0);
            const float *x3 = x0 + (ni > 3 ? 3 * ldx : 0);
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
            __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            ptrdiff_t p = 0;
            for (; p < body; p += 8) {
                __m256 u = _mm256_loadu_ps(w0 + p), v = _mm256_loadu_ps(w1 + p), t;
                if (i0 == 0 && !(p & 15)) {       /* once per 64 bytes */
                    _mm_prefetch((const char *)(w0 + p + pf), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w1 + p + pf), _MM_HINT_T0);
                }
                t = _mm256_loadu_ps(x0 + p); a00 = _mm256_fmadd_ps(t, u, a00); a01 = _mm256_fmadd_ps(t, v, a01);
                t = _mm256_loadu_ps(x1 + p); a10 = _mm256_fmadd_ps(t, u, a10); a11 = _mm256_fmadd_ps(t, v, a11);
                t = _mm256_loadu_ps(x2 + p); a20 = _mm256_fmadd_ps(t, u, a20); a21 = _mm256_fmadd_ps(t, v, a21);
                t = _mm256_loadu_ps(x3 + p); a30 = _mm256_fmadd_ps(t, u, a30); a31 = _mm256_fmadd_ps(t, v, a31);
            }
            if (tail) {
                __m256 u = _mm256_maskload_ps(w0 + p, mask), v = _mm256_maskload_ps(w1 + p, mask), t;
                t = _mm256_maskload_ps(x0 + p, mask); a00 = _mm256_fmadd_ps(t, u, a00); a01 = _mm256_fmadd_ps(t, v, a01);
                t = _mm256_maskload_ps(x1 + p, mask); a10 = _mm256_fmadd_ps(t, u, a10); a11 = _mm256_fmadd_ps(t, v, a11);
                t = _mm256_maskload_ps(x2 + p, mask); a20 = _mm256_fmadd_ps(t, u, a20); a21 = _mm256_fmadd_ps(t, v, a21);
                t = _mm256_maskload_ps(x3 + p, mask); a30 = _mm256_fmadd_ps(t, u, a30); a31 = _mm256_fmadd_ps(t, v, a31);
            }
            float r0[4], r1[4];
            _mm_storeu_ps(r0, ff_hsum4x8(a00, a10, a20, a30));
            _mm_storeu_ps(r1, ff_hsum4x8(a01, a11, a21, a31));
            for (ptrdiff_t i = 0; i < ni; i++) {
                float *q0 = o0 + (i0 + i) * ldo, *q1 = o1 + (i0 + i) * ldo;
                if (accumulate) { *q0 += r0[i]; if (q1 != q0) *q1 += r1[i]; }
                else { *q0 = r0[i]; *q1 = r1[i]; }
            }
        }
    }
    #endif

    /* 1 if it ran (AVX2 available), 0 if the caller must use the BLAS */
    static int ff_gemm_smalln_f32(ptrdiff_t n, ptrdiff_t m, ptrdiff_t k, const float *x,
                                  ptrdiff_t ldx, const float *w, ptrdiff_t ldw, float *out,
                                  ptrdiff_t ldo, int accumulate) {
    #if FF_X86
        if (!ff_avx2) return 0;
        ptrdiff_t h = m / 2;                /* row j pairs with row j + h */
        for (ptrdiff_t j = 0; j < h; j++)
            ff_smalln_pair(n, k, x, ldx, w + j * ldw, w + (j + h) * ldw, out + j, out + j + h,
                           ldo, accumulate, ldw);
        if (m % 2)
            ff_smalln_pair(n, k, x, ldx, w + (m - 1) * ldw, w + (m - 1) * ldw, out + m - 1,
                           out + m - 1, ldo, accumulate, ldw);
        return 1;
    #else
        (void)n; (void)m; (void)k; (void)x; (void)ldx; (void)w; (void)ldw; (void)out;
        (void)ldo; (void)accumulate;
        return 0;
    #endif
    }

    /* Calls of (FF_SMALL_N, FF_PACKED_MAX_N] rows of a float32 projection: the attention
     * tiles' micro-kernel (_gemm.h), fed with w packed in blocks of FF_NC rows x FF_KC
     * columns (64 KiB; each 16-column panel of it serves every row of x before the next is
     * read).  SciPy's OpenBLAS (0.3.30) is slow on few-row GEMMs: 1 thread, GF/s, this
     * kernel / sgemm, medians of 3 processes over (m, k) = (2304, 768), (768, 3072),
     * (1536, 512): 12 rows 53-58 / 28-29; 24 rows 69-74 / 43; 96 rows 82-87 / 71-73; 256
     * rows 86-89 / 81-84; 384 rows 85-90 / 85-87; 1024 rows 83-88 / 89-92.  An output
     * element is the sum, in order, of its 512-column blocks' partial sums (each one FMA per
     * term), whatever the other rows or columns of the chunk: threads that split a call give
     * bitwise its one-thread result.  1 if it ran, 0 if the caller must use the BLAS. */
    #define FF_PACKED_MAX_N 256
    #define FF_NC 32
    #define FF_KC 512
    static int ff_gemm_packed_f32(ptrdiff_t n, ptrdiff_t m, ptrdiff_t k, const float *x,
                                  ptrdiff_t ldx, const float *w, ptrdiff_t ldw, float *out,
                                  ptrdiff_t ldo, int accumulate) {
    #if FF_X86
        if (!ff_avx2) return 0;
        float *wp = (float *)malloc(FF_NC * FF_KC * sizeof(float));
        if (wp == NULL) return 0;
        for (ptrdiff_t j0 = 0; j0 < m; j0 += FF_NC) {
            ptrdiff_t nc = m - j0 < FF_NC ? m - j0 : FF_NC;
            for (ptrdiff_t p0 = 0; p0 < k; p0 += FF_KC) {
                ptrdiff_t kc = k - p0 < FF_KC ? k - p0 : FF_KC;
                fa_pack_t_f32(w + j0 * ldw + p0, ldw, nc, kc, wp);
                fa_gemm_f32(n, nc, kc, x + p0, ldx, wp, kc, out + j0, ldo, accumulate || p0);
            }
        }
        free(wp);
        return 1;
    #else
        (void)n; (void)m; (void)k; (void)x; (void)ldx; (void)w; (void)ldw; (void)out;
        (void)ldo; (void)accumulate;
        return 0;
    #endif
    }
    """
    const char *ff_simd_init(int use_simd) nogil
    void ff_bias_act_f32(float *y, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t ld,
                         const float *bias, int act) noexcept nogil
    void ff_bias_act_f64(double *y, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t ld,
                         const double *bias, int act) noexcept nogil
    void ff_add_ln_f32(const float *x, const float *y, float *h, float *o, const float *g,
                       const float *b, double eps, Py_ssize_t n) noexcept nogil
    void ff_add_ln_f64(const double *x, const double *y, double *h, double *o,
                       const double *g, const double *b, double eps, Py_ssize_t n) noexcept nogil
    int FF_SMALL_N
    int ff_gemm_smalln_f32(Py_ssize_t n, Py_ssize_t m, Py_ssize_t k, const float *x,
                           Py_ssize_t ldx, const float *w, Py_ssize_t ldw, float *out,
                           Py_ssize_t ldo, int accumulate) noexcept nogil
    int FF_PACKED_MAX_N
    int ff_gemm_packed_f32(Py_ssize_t n, Py_ssize_t m, Py_ssize_t k, const float *x,
                           Py_ssize_t ldx, const float *w, Py_ssize_t ldw, float *out,
                           Py_ssize_t ldo, int accumulate) noexcept nogil

cdef enum BlasTrans:
    NoTrans = 110  # 'n'
    Trans = 116    # 't'

ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
INT32_MAX = 2**31 - 1
PARALLEL_MIN_FLOPS = 1 << 21    # smaller GEMMs run on the calling thread
ROWS_PER_THREAD = 32            # fewer rows than this per thread: split the columns instead
LN_PARALLEL_MIN = 1 << 15       # elements; smaller LayerNorms run on the calling thread
SMALL_N = FF_SMALL_N             # up to this many rows, float32 projections stream w once
STREAM_CHUNK = 256              # output columns per chunk of the streaming kernel


ctypedef struct Linear:
    Py_ssize_t n, m, k            # out (n x m) = x (n x k) · wᵀ, w (m x k)
    char *x                       # IN  rows of k, row stride ldx
    Py_ssize_t ldx
    char *w                       # IN  rows of k, row stride ldw
    Py_ssize_t ldw
    char *b                       # IN  (m,) or NULL
    char *out                     # OUT rows of m, row stride ldo
    Py_ssize_t ldo
    int act                       # FF_NONE / RELU / GELU / GELU_TANH
    int accumulate                # 1: out += ..., 0: out = ...
    int split_rows                # chunks are row ranges (1) or column ranges (0)
    Py_ssize_t nchunks, step      # chunk c covers [c * step, min((c + 1) * step, extent))


cdef inline void gemm_nt(int m, int n, int k, floating *x, int ldx, floating *w, int ldw,
                         floating beta, floating *out, int ldo) noexcept nogil:
    """out (m x n, row-major) := x (m x k) · wᵀ (w: n x k, row-major) + beta * out.

    Column-major, that is outᵀ = op(w)ᵀ-as-stored · xᵀ: gemm('t', 'n', n, m, k, w, x)."""
    cdef char ta = Trans, tb = NoTrans
    cdef floating one = 1
    if floating is float:
        sgemm(&ta, &tb, &n, &m, &k, &one, w, &ldw, x, &ldx, &beta, out, &ldo)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &one, w, &ldw, x, &ldx, &beta, out, &ldo)


cdef void linear_chunk(const Linear *L, Py_ssize_t c, floating dummy) noexcept nogil:
    """Chunk c of the projection: its GEMM, then bias + activation on the same block."""
    cdef Py_ssize_t r0 = 0, r1 = L.n, c0 = 0, c1 = L.m, i
    if L.split_rows:
        r0 = c * L.step
        r1 = min(L.n, r0 + L.step)
    else:
        c0 = c * L.step
        c1 = min(L.m, c0 + L.step)
    if r1 <= r0 or c1 <= c0:
        return
    cdef floating *x = <floating *>L.x + r0 * L.ldx
    cdef floating *w = <floating *>L.w + c0 * L.ldw
    cdef floating *o = <floating *>L.out + r0 * L.ldo + c0
    cdef floating *b = <floating *>L.b + c0 if L.b != NULL else NULL
    cdef bint done = False
    # the kernel follows the whole call's row count, not the chunk's: every chunk then sums
    # in the same order, and the result does not depend on the thread count
    if floating is float:
        if L.k > 0 and L.n <= FF_SMALL_N:
            done = ff_gemm_smalln_f32(r1 - r0, c1 - c0, L.k, x, L.ldx, w, L.ldw, o, L.ldo,
                                      L.accumulate)
        elif L.k > 0 and L.n <= FF_PACKED_MAX_N:
            done = ff_gemm_packed_f32(r1 - r0, c1 - c0, L.k, x, L.ldx, w, L.ldw, o, L.ldo,
                                      L.accumulate)
    if done:
        pass
    elif L.k > 0:
        gemm_nt(<int>(r1 - r0), <int>(c1 - c0), <int>L.k, x, <int>L.ldx, w, <int>L.ldw,
                <floating>(1 if L.accumulate else 0), o, <int>L.ldo)
    elif not L.accumulate:
        for i in range(r1 - r0):
            memset(o + i * L.ldo, 0, (c1 - c0) * sizeof(floating))
    if floating is float:
        ff_bias_act_f32(o, r1 - r0, c1 - c0, L.ldo, b, L.act)
    else:
        ff_bias_act_f64(o, r1 - r0, c1 - c0, L.ldo, b, L.act)


cdef void linear_run(const Linear *L, int nthreads, floating dummy) noexcept nogil:
    cdef Py_ssize_t c
    if nthreads <= 1 or L.nchunks <= 1:
        for c in range(L.nchunks):
            linear_chunk(L, c, dummy)
    elif L.nchunks > nthreads:
        # many small streaming chunks (few rows): a thread that starts late (a busy machine)
        # finds the work already taken instead of holding the others at the barrier
        for c in prange(L.nchunks, num_threads=nthreads, schedule='dynamic'):
            linear_chunk(L, c, dummy)
    else:
        for c in prange(L.nchunks, num_threads=nthreads, schedule='static'):
            linear_chunk(L, c, dummy)


cdef Py_ssize_t _row_stride(cnp.ndarray a, str name) except -1:
    """Row stride (elements) of a 2-D array with a unit-stride last axis, or raise."""
    cdef Py_ssize_t isz = a.itemsize
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {(<object>a).shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        return max(1, a.shape[1])                  # nothing is read or written
    if a.shape[1] > 1 and a.strides[1] != isz:
        raise ValueError(f"{name} must have a unit-stride last axis, got strides "
                         f"{(<object>a).strides}")
    if a.shape[0] <= 1:
        return max(1, a.shape[1])
    if a.strides[0] % isz or a.strides[0] // isz < max(1, a.shape[1]):
        raise ValueError(f"{name} rows must not overlap, got shape {(<object>a).shape} and "
                         f"strides {(<object>a).strides}")
    if a.strides[0] // isz > INT32_MAX:
        raise ValueError(f"{name}: row stride exceeds the 32-bit BLAS limit 2**31 - 1")
    return a.strides[0] // isz


cdef inline char *_data(cnp.ndarray a):
    return <char *>cnp.PyArray_DATA(a) if a is not None else NULL


def linear(cnp.ndarray x, cnp.ndarray weight, cnp.ndarray bias, cnp.ndarray out, activation=None,
           bint accumulate=False, int nthreads=1):
    """out (N, M) := act(x (N, K) · weightᵀ + bias), or out += x · weightᵀ + bias (accumulate).

    weight is (M, K) (PyTorch's Linear layout); bias (M,) or None.  x, weight, out must share
    a float32/float64 dtype and have unit-stride rows.  The GEMM runs on ``nthreads`` OpenMP
    threads (rows, or columns when there are few rows, split into one chunk per thread); the
    caller holds the BLAS to one thread (``with blas_guard:``).  The GIL is released.
    Returns out.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of 'relu', 'gelu', 'gelu_tanh' or None, "
                         f"got {activation!r}")
    cdef int act = ACTIVATIONS[activation]
    if accumulate and act:
        raise ValueError("accumulate=True takes no activation")
    if nthreads < 1:
        raise ValueError(f"nthreads must be >= 1, got {nthreads}")
    dt = x.dtype
    if dt != np.float32 and dt != np.float64:
        raise TypeError(f"x must be float32 or float64, got {dt}")
    if weight.dtype != dt or out.dtype != dt or (bias is not None and bias.dtype != dt):
        raise TypeError(f"x, weight, bias and out must share one dtype, got x {dt}, weight "
                        f"{weight.dtype}, out {out.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else ""))
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    cdef Linear L
    L.ldx = _row_stride(x, "x")
    L.ldw = _row_stride(weight, "weight")
    L.ldo = _row_stride(out, "out")
    L.n, L.k = x.shape[0], x.shape[1]
    L.m = weight.shape[0]
    if weight.shape[1] != L.k or out.shape[0] != L.n or out.shape[1] != L.m:
        raise ValueError(f"shapes do not match: x {(<object>x).shape}, weight "
                         f"{(<object>weight).shape}, out {(<object>out).shape} (expected out "
                         f"{(L.n, L.m)})")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != L.m or
                             (L.m > 1 and bias.strides[0] != bias.itemsize)):
        raise ValueError(f"bias must be a contiguous ({L.m},) array, got shape "
                         f"{(<object>bias).shape}")
    if max(L.n, L.m, L.k) > INT32_MAX:
        raise ValueError(f"a size of x {(<object>x).shape} or weight {(<object>weight).shape} "
                         f"exceeds the 32-bit BLAS limit 2**31 - 1")
    if L.n == 0 or L.m == 0:
        return out
    if (np.may_share_memory(out, x) or np.may_share_memory(out, weight) or
            (bias is not None and np.may_share_memory(out, bias))):
        raise ValueError("out must not overlap x, weight or bias")
    L.x, L.w, L.b, L.out = _data(x), _data(weight), _data(bias), _data(out)
    L.act, L.accumulate = act, accumulate

    # policy: one chunk per thread, over rows when each thread gets enough of them
    cdef Py_ssize_t nt = nthreads
    if 2 * L.n * L.m * max(L.k, 1) < PARALLEL_MIN_FLOPS:
        nt = 1
    # each thread packs the whole operand that is not split: split the larger one (x's rows
    # or w's rows, i.e. out's columns), rows only when each thread gets enough of them
    L.split_rows = L.n >= ROWS_PER_THREAD * nt and (L.n >= L.m or L.m < 16 * nt)
    cdef Py_ssize_t extent = L.n if L.split_rows else L.m
    cdef Py_ssize_t align = 8 if L.split_rows else 16
    nt = min(nt, extent)
    L.step = (extent + nt - 1) // nt
    if not L.split_rows and L.n <= SMALL_N and nt > 1:
        L.step = min(L.step, STREAM_CHUNK)             # the streaming kernel: dynamic chunks
    L.step = min(extent, (L.step + align - 1) // align * align)
    L.nchunks = (extent + L.step - 1) // L.step
    cdef int nth = <int>min(nt, L.nchunks)
    cdef float f32 = 0
    cdef double f64 = 0
    if dt == np.float32:
        with nogil:
            linear_run(&L, nth, f32)
    else:
        with nogil:
            linear_run(&L, nth, f64)
    return out


cdef void ln_rows(const char *x, Py_ssize_t ldx, const char *y, Py_ssize_t ldy,
                  char *h, Py_ssize_t ldh, char *o, Py_ssize_t ldo,
                  const char *g, const char *b, double eps, Py_ssize_t n, Py_ssize_t e,
                  int nthreads, floating dummy) noexcept nogil:
    cdef Py_ssize_t i
    cdef const floating *xp = <const floating *>x
    cdef const floating *yp = <const floating *>y
    cdef floating *hp = <floating *>h
    cdef floating *op = <floating *>o
    if nthreads <= 1:
        for i in range(n):
            ln_row(xp + i * ldx, yp + i * ldy if yp != NULL else NULL,
                   hp + i * ldh if hp != NULL else NULL, op + i * ldo,
                   <const floating *>g, <const floating *>b, eps, e)
    else:
        for i in prange(n, num_threads=nthreads, schedule='static'):
            ln_row(xp + i * ldx, yp + i * ldy if yp != NULL else NULL,
                   hp + i * ldh if hp != NULL else NULL, op + i * ldo,
                   <const floating *>g, <const floating *>b, eps, e)


cdef inline void ln_row(const floating *x, const floating *y, floating *h, floating *o,
                        const floating *g, const floating *b, double eps,
                        Py_ssize_t e) noexcept nogil:
    if floating is float:
        ff_add_ln_f32(x, y, h, o, g, b, eps, e)
    else:
        ff_add_ln_f64(x, y, h, o, g, b, eps, e)


def _same_or_disjoint(cnp.ndarray a, cnp.ndarray b):
    """True when a and b are the same memory element for element, or do not overlap."""
    if a is None or b is None or not np.may_share_memory(a, b):
        return True
    return (cnp.PyArray_DATA(a) == cnp.PyArray_DATA(b) and
            (<object>a).strides == (<object>b).strides)


def add_layernorm(cnp.ndarray x, cnp.ndarray y, cnp.ndarray gamma, cnp.ndarray beta, double eps,
                  cnp.ndarray sum_out, cnp.ndarray norm_out, int nthreads=1):
    """Residual + LayerNorm over the last axis, one pass per row, GIL released.

    h = x + y (y may be None); sum_out := h when given; norm_out := (h - mean) /
    sqrt(var + eps) * gamma + beta.  All (N, E) with unit-stride rows, gamma/beta (E,)
    contiguous; outputs may be the inputs themselves (in place), not partly overlapping them.
    Returns norm_out.
    """
    if nthreads < 1:
        raise ValueError(f"nthreads must be >= 1, got {nthreads}")
    dt = x.dtype
    if dt != np.float32 and dt != np.float64:
        raise TypeError(f"x must be float32 or float64, got {dt}")
    arrays = {"x": x, "y": y, "sum_out": sum_out, "norm_out": norm_out}
    for name, a in arrays.items():
        if a is not None and (a.dtype != dt or (<object>a).shape != (<object>x).shape):
            raise ValueError(f"{name} must have x's shape {(<object>x).shape} and dtype {dt}, "
                             f"got {(<object>a).shape} {a.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N, E), got shape {(<object>x).shape}")
    # gamma and beta are a LayerNorm's weight and bias
    for name, a in (("weight (gamma)", gamma), ("bias (beta)", beta)):
        if (a.dtype != dt or a.ndim != 1 or a.shape[0] != x.shape[1] or
                (a.shape[0] > 1 and a.strides[0] != a.itemsize)):
            raise ValueError(f"LayerNorm {name} must be a contiguous ({x.shape[1]},) {dt} "
                             f"array, got {(<object>a).shape} {a.dtype}")
    if not 0 <= eps < INFINITY:
        raise ValueError(f"LayerNorm eps must be finite and >= 0, got {eps}")
    for name, a in (("sum_out", sum_out), ("norm_out", norm_out)):
        if a is not None and not a.flags.writeable:
            raise ValueError(f"{name} is read-only")
    if norm_out is None:
        raise ValueError("norm_out is required")
    cdef Py_ssize_t ldx = _row_stride(x, "x")
    cdef Py_ssize_t ldy = _row_stride(y, "y") if y is not None else 0
    cdef Py_ssize_t ldh = _row_stride(sum_out, "sum_out") if sum_out is not None else 0
    cdef Py_ssize_t ldo = _row_stride(norm_out, "norm_out")
    for o in (sum_out, norm_out):
        for i in (x, y):
            if not _same_or_disjoint(o, i):
                raise ValueError("an output partly overlaps an input")
    if not _same_or_disjoint(sum_out, norm_out) or (
            sum_out is not None and np.may_share_memory(sum_out, norm_out)):
        raise ValueError("sum_out and norm_out must not overlap")
    cdef Py_ssize_t n = x.shape[0], e = x.shape[1]
    if n == 0 or e == 0:
        return norm_out
    cdef int nt = <int>min(nthreads, n) if n * e >= LN_PARALLEL_MIN else 1
    cdef float f32 = 0
    cdef double f64 = 0
    cdef char *xp = _data(x)
    cdef char *yp = _data(y)
    cdef char *hp = _data(sum_out)
    cdef char *op = _data(norm_out)
    cdef char *gp = _data(gamma)
    cdef char *bp = _data(beta)
    if dt == np.float32:
        with nogil:
            ln_rows(xp, ldx, yp, ldy, hp, ldh, op, ldo, gp, bp, eps, n, e, nt, f32)
    else:
        with nogil:
            ln_rows(xp, ldx, yp, ldy, hp, ldh, op, ldo, gp, bp, eps, n, e, nt, f64)
    return norm_out


def bias_act(cnp.ndarray y, cnp.ndarray bias, activation):
    """y := act(y + bias) in place on the calling thread (the per-chunk pass of `linear`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}")
    dt = y.dtype
    if dt != np.float32 and dt != np.float64:
        raise TypeError(f"y must be float32 or float64, got {dt}")
    cdef Py_ssize_t ld = _row_stride(y, "y")
    if not y.flags.writeable:
        raise ValueError("y is read-only")
    if bias is not None and (bias.dtype != dt or bias.ndim != 1 or bias.shape[0] != y.shape[1]
                             or (bias.shape[0] > 1 and bias.strides[0] != bias.itemsize)):
        raise ValueError(f"bias must be a contiguous ({y.shape[1]},) {dt} array")
    cdef int act = ACTIVATIONS[activation]
    cdef Py_ssize_t rows = y.shape[0], cols = y.shape[1]
    cdef char *yp = _data(y)
    cdef char *bp = _data(bias)
    cdef bint single = dt == np.float32
    with nogil:
        if single:
            ff_bias_act_f32(<float *>yp, rows, cols, ld, <const float *>bp, act)
        else:
            ff_bias_act_f64(<double *>yp, rows, cols, ld, <const double *>bp, act)
    return y


def simd_init(bint use_simd=True):
    """Select the activation pass ('avx2+fma' or 'scalar'); returns its name."""
    return ff_simd_init(use_simd).decode()


def _blas_init():
    p = fa_blas_init(<void *>sgemm)
    return p.decode() if p != NULL else None


SIMD = simd_init(True)
BLAS_PATH = _blas_init()
