/* The attention tiles' two products with a register-blocked AVX2/FMA micro-kernel, for
 * shapes where a BLAS call loses to its own packing: Q·Kᵀ has the head dimension (64, 128)
 * as its inner size, and every tile is packed again by the BLAS on each call.  The blocks'
 * projections of 9 to 256 rows use it too (_fused.pyx).
 *
 *   C (m x n, row stride ldc) := A · B      or  C += A · B       (accumulate)
 *
 * A is m x k, row-major with row stride lda, read in place (six rows at a time, one element
 * of each broadcast per step).  B is k x n, packed beforehand into panels of FA_NR columns:
 * panel p holds columns [p NR, p NR + NR) as kp >= k consecutive rows of NR elements, zero
 * past n (so rows [k0, k0 + k) of a packed B are Bp + k0 NR with the same kp).
 *   fa_pack_t:  B = Xᵀ for X (n x k, row stride ldx): the keys of Q·Kᵀ
 *   fa_pack_n:  B = X  for X (k x n, row stride ldx): the values of P·V; returns 1 when
 *               every element is finite
 * The micro-kernel keeps a 6 x NR block of C in twelve registers over the whole k loop, so
 * each B element loaded feeds 6 FMAs and each A element 2 vector FMAs.  Rows and columns
 * past m, n are computed on duplicated / zero inputs and never stored.
 *
 * The sums run over k in order, one FMA each: the same inputs give bitwise the same C on
 * every thread count.  x86-64 only; elsewhere (and without AVX2/FMA at run time) the kernel
 * calls the BLAS instead (fa_gemm_ok == 0).
 */
#ifndef FASTATTN_GEMM_H
#define FASTATTN_GEMM_H

#include <stddef.h>
#include <string.h>

#include "_vecmath.h"

#define FA_MR 6
#define FA_NR_F32 16
#define FA_NR_F64 8

/* elements of scratch a packed operand of n columns (rounded up to panels) and k rows needs */
#define FA_PACKED_SIZE(n, k, nr) ((((n) + (nr) - 1) / (nr)) * (nr) * (k))

static int fa_gemm_ok FA_UNUSED = 0;

#ifdef FA_HAVE_X86

/* One generator for both dtypes: V is the vector type, W its width, NR = 2 W. */
#define FA_GEMM_DEFINE(SUF, T, V, W, LOADU, STOREU, SET1, ZERO, FMADD, ADD, SUB)              \
FA_AVX2 static void fa_ukr_##SUF(ptrdiff_t k, const T *A, ptrdiff_t lda, ptrdiff_t mr,       \
                                 const T *B, T *C, ptrdiff_t ldc, ptrdiff_t nr,              \
                                 int accumulate) {                                           \
    const T *a0 = A;                                                                         \
    const T *a1 = A + (mr > 1 ? 1 : 0) * lda;                                                \
    const T *a2 = A + (mr > 2 ? 2 : 0) * lda;                                                \
    const T *a3 = A + (mr > 3 ? 3 : 0) * lda;                                                \
    const T *a4 = A + (mr > 4 ? 4 : 0) * lda;                                                \
    const T *a5 = A + (mr > 5 ? 5 : 0) * lda;                                                \
    V c00 = ZERO(), c01 = ZERO(), c10 = ZERO(), c11 = ZERO(), c20 = ZERO(), c21 = ZERO();    \
    V c30 = ZERO(), c31 = ZERO(), c40 = ZERO(), c41 = ZERO(), c50 = ZERO(), c51 = ZERO();    \
    for (ptrdiff_t p = 0; p < k; p++) {                                                      \
        V b0 = LOADU(B + p * 2 * W), b1 = LOADU(B + p * 2 * W + W), t;                       \
        t = SET1(a0[p]); c00 = FMADD(t, b0, c00); c01 = FMADD(t, b1, c01);                   \
        t = SET1(a1[p]); c10 = FMADD(t, b0, c10); c11 = FMADD(t, b1, c11);                   \
        t = SET1(a2[p]); c20 = FMADD(t, b0, c20); c21 = FMADD(t, b1, c21);                   \
        t = SET1(a3[p]); c30 = FMADD(t, b0, c30); c31 = FMADD(t, b1, c31);                   \
        t = SET1(a4[p]); c40 = FMADD(t, b0, c40); c41 = FMADD(t, b1, c41);                   \
        t = SET1(a5[p]); c50 = FMADD(t, b0, c50); c51 = FMADD(t, b1, c51);                   \
    }                                                                                        \
    V c[FA_MR][2] = {{c00, c01}, {c10, c11}, {c20, c21},                                     \
                     {c30, c31}, {c40, c41}, {c50, c51}};                                    \
    if (nr == 2 * W) {                                                                       \
        for (ptrdiff_t i = 0; i < mr; i++) {                                                 \
            T *ci = C + i * ldc;                                                             \
            if (accumulate) {                                                                \
                c[i][0] = ADD(c[i][0], LOADU(ci));                                           \
                c[i][1] = ADD(c[i][1], LOADU(ci + W));                                       \
            }                                                                                \
            STOREU(ci, c[i][0]);                                                             \
            STOREU(ci + W, c[i][1]);                                                         \
        }                                                                                    \
    } else {                                                                                 \
        T tmp[2 * W];                                                                        \
        for (ptrdiff_t i = 0; i < mr; i++) {                                                 \
            T *ci = C + i * ldc;                                                             \
            STOREU(tmp, c[i][0]);                                                            \
            STOREU(tmp + W, c[i][1]);                                                        \
            for (ptrdiff_t j = 0; j < nr; j++)                                               \
                ci[j] = accumulate ? tmp[j] + ci[j] : tmp[j];                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* C (m x n) (+)= A (m x k) · B (packed, kp rows a panel); column panels outer, so one      \
 * panel of B (k x NR) stays in L1 while the row blocks of A stream past it. */              \
FA_AVX2 static void fa_gemm_##SUF(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const T *A,         \
                                  ptrdiff_t lda, const T *Bp, ptrdiff_t kp, T *C,            \
                                  ptrdiff_t ldc, int accumulate) {                           \
    for (ptrdiff_t j = 0; j < n; j += 2 * W) {                                               \
        const T *bp = Bp + (j / (2 * W)) * kp * 2 * W;                                       \
        ptrdiff_t nr = n - j < 2 * W ? n - j : 2 * W;                                        \
        for (ptrdiff_t i = 0; i < m; i += FA_MR)                                             \
            fa_ukr_##SUF(k, A + i * lda, lda, m - i < FA_MR ? m - i : FA_MR, bp,             \
                         C + i * ldc + j, ldc, nr, accumulate);                              \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* Bp := the panels of X (k x n, row stride ldx): contiguous row pieces, zero past n.        \
 * Returns 1 when every element of X is finite: v - v is 0 for finite v and NaN otherwise,   \
 * and a sum of those is 0 only when all of them are. */                                     \
FA_AVX2 static int fa_pack_n_##SUF(const T *X, ptrdiff_t ldx, ptrdiff_t k, ptrdiff_t n,     \
                                   T *Bp) {                                                  \
    V bad = ZERO();                                                                          \
    T bad_tail = 0;                                                                          \
    for (ptrdiff_t j = 0; j < n; j += 2 * W) {                                               \
        ptrdiff_t nr = n - j < 2 * W ? n - j : 2 * W;                                        \
        T *bp = Bp + (j / (2 * W)) * k * 2 * W;                                              \
        for (ptrdiff_t p = 0; p < k; p++) {                                                  \
            const T *x = X + p * ldx + j;                                                    \
            T *d = bp + p * 2 * W;                                                           \
            if (nr == 2 * W) {                                                               \
                V v0 = LOADU(x), v1 = LOADU(x + W);                                          \
                STOREU(d, v0);                                                               \
                STOREU(d + W, v1);                                                           \
                bad = ADD(bad, ADD(SUB(v0, v0), SUB(v1, v1)));                               \
                continue;                                                                    \
            }                                                                                \
            for (ptrdiff_t t = 0; t < nr; t++) {                                             \
                d[t] = x[t];                                                                 \
                bad_tail += x[t] - x[t];                                                     \
            }                                                                                \
            for (ptrdiff_t t = nr; t < 2 * W; t++) d[t] = 0;                                 \
        }                                                                                    \
    }                                                                                        \
    T lanes[W];                                                                              \
    STOREU(lanes, bad);                                                                      \
    for (ptrdiff_t t = 0; t < W; t++) bad_tail += lanes[t];                                  \
    return bad_tail == 0;                                                                    \
}                                                                                            \
                                                                                             \
/* Bp := the panels of Xᵀ for X (n x k, row stride ldx): row r of X becomes column r */      \
FA_UNUSED static void fa_pack_t_##SUF##_plain(const T *X, ptrdiff_t ldx, ptrdiff_t n,        \
                                              ptrdiff_t k, T *Bp) {                          \
    for (ptrdiff_t j = 0; j < n; j += 2 * W) {                                               \
        ptrdiff_t nr = n - j < 2 * W ? n - j : 2 * W;                                        \
        T *bp = Bp + (j / (2 * W)) * k * 2 * W;                                              \
        for (ptrdiff_t t = 0; t < nr; t++) {                                                 \
            const T *x = X + (j + t) * ldx;                                                  \
            for (ptrdiff_t p = 0; p < k; p++) bp[p * 2 * W + t] = x[p];                      \
        }                                                                                    \
        for (ptrdiff_t t = nr; t < 2 * W; t++)                                               \
            for (ptrdiff_t p = 0; p < k; p++) bp[p * 2 * W + t] = 0;                         \
    }                                                                                        \
}

FA_GEMM_DEFINE(f32, float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps,
               _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_sub_ps)
FA_GEMM_DEFINE(f64, double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_set1_pd,
               _mm256_setzero_pd, _mm256_fmadd_pd, _mm256_add_pd, _mm256_sub_pd)

/* d[i NR + t] := x[t ldx + i] for i, t < 8: eight rows of eight floats transposed, stored as
 * eight rows NR apart (8 x 8 in registers: unpack, shuffle, then swap the 128-bit halves) */
FA_AVX2 static inline void fa_transpose8_f32(const float *x, ptrdiff_t ldx, float *d,
                                             ptrdiff_t nr) {
    __m256 r0 = _mm256_loadu_ps(x), r1 = _mm256_loadu_ps(x + ldx);
    __m256 r2 = _mm256_loadu_ps(x + 2 * ldx), r3 = _mm256_loadu_ps(x + 3 * ldx);
    __m256 r4 = _mm256_loadu_ps(x + 4 * ldx), r5 = _mm256_loadu_ps(x + 5 * ldx);
    __m256 r6 = _mm256_loadu_ps(x + 6 * ldx), r7 = _mm256_loadu_ps(x + 7 * ldx);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d + 0 * nr, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + 1 * nr, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * nr, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * nr, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * nr, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * nr, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * nr, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * nr, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* the same for four rows of four doubles */
FA_AVX2 static inline void fa_transpose4_f64(const double *x, ptrdiff_t ldx, double *d,
                                             ptrdiff_t nr) {
    __m256d r0 = _mm256_loadu_pd(x), r1 = _mm256_loadu_pd(x + ldx);
    __m256d r2 = _mm256_loadu_pd(x + 2 * ldx), r3 = _mm256_loadu_pd(x + 3 * ldx);
    __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
    __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(d + 0 * nr, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(d + 1 * nr, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(d + 2 * nr, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(d + 3 * nr, _mm256_permute2f128_pd(t1, t3, 0x31));
}

/* fa_pack_t with full panels of NR rows as B x B register transposes (B = the vector width);
 * the features past the last multiple of B one by one, a last partial panel in plain C */
#define FA_PACK_T_DEFINE(SUF, T, B, TRANSPOSE)                                               \
FA_AVX2 static void fa_pack_t_##SUF(const T *X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t k,    \
                                    T *Bp) {                                                 \
    const ptrdiff_t NR = 2 * B;                                                              \
    ptrdiff_t nfull = n / NR * NR, kb = k / B * B;                                           \
    for (ptrdiff_t j = 0; j < nfull; j += NR) {                                              \
        T *bp = Bp + (j / NR) * k * NR;                                                      \
        for (ptrdiff_t half = 0; half < NR; half += B) {                                     \
            const T *x = X + (j + half) * ldx;                                               \
            for (ptrdiff_t p = 0; p < kb; p += B)                                            \
                TRANSPOSE(x + p, ldx, bp + p * NR + half, NR);                               \
            for (ptrdiff_t t = 0; t < B; t++)                                                \
                for (ptrdiff_t p = kb; p < k; p++) bp[p * NR + half + t] = x[t * ldx + p];  \
        }                                                                                    \
    }                                                                                        \
    if (nfull < n)                                                                           \
        fa_pack_t_##SUF##_plain(X + nfull * ldx, ldx, n - nfull, k, Bp + (nfull / NR) * k * NR); \
}
FA_PACK_T_DEFINE(f32, float, 8, fa_transpose8_f32)
FA_PACK_T_DEFINE(f64, double, 4, fa_transpose4_f64)

#else  /* no x86-64: never called (fa_gemm_ok stays 0), defined so the kernel links */

#define FA_GEMM_STUB(SUF, T)                                                                 \
FA_UNUSED static void fa_gemm_##SUF(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const T *A,       \
                                    ptrdiff_t lda, const T *Bp, ptrdiff_t kp, T *C,          \
                                    ptrdiff_t ldc, int accumulate) {                         \
    (void)m; (void)n; (void)k; (void)A; (void)lda; (void)Bp; (void)kp; (void)C; (void)ldc;   \
    (void)accumulate;                                                                        \
}                                                                                            \
FA_UNUSED static int fa_pack_n_##SUF(const T *X, ptrdiff_t ldx, ptrdiff_t k, ptrdiff_t n,    \
                                     T *Bp) {                                                \
    (void)X; (void)ldx; (void)k; (void)n; (void)Bp;                                          \
    return 0;                                                                                \
}                                                                                            \
FA_UNUSED static void fa_pack_t_##SUF(const T *X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t k,   \
                                      T *Bp) {                                               \
    (void)X; (void)ldx; (void)n; (void)k; (void)Bp;                                          \
}
FA_GEMM_STUB(f32, float)
FA_GEMM_STUB(f64, double)

#endif  /* FA_HAVE_X86 */

#endif  /* FASTATTN_GEMM_H */
