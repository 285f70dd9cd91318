/* Row passes of the online softmax (max, then p = exp(x - m) in place with its sum), and the
 * few-row Q·Kᵀ and P·V of the decode path.
 *
 * Two implementations of each pass sit side by side: a plain C one (libm exp), which every
 * target builds, and on x86-64 an AVX2/FMA one compiled with a function-level target
 * attribute.  fa_simd_init() picks one at run time from the CPU's feature bits, so the
 * default build stays portable (no -march flag) and still runs the vector path where it can.
 *
 * exp(-inf) is exactly 0 and NaN propagates in both implementations; nothing here assumes
 * -ffast-math.
 */
#ifndef FASTATTN_SIMD_H
#define FASTATTN_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_vecmath.h"
#include "_gemm.h"

typedef float (*fa_max_f32_t)(const float *x, ptrdiff_t n);
typedef double (*fa_max_f64_t)(const double *x, ptrdiff_t n);
/* x := exp((x - m) k) in place; returns the sum (k = 1: exp(x - m), bit for bit) */
typedef float (*fa_expsum_f32_t)(float *x, ptrdiff_t n, float m, float k);
typedef double (*fa_expsum_f64_t)(double *x, ptrdiff_t n, double m, double k);
/* The Q·Kᵀ kernels also fetch rows [0, n) of another matrix into the cache as K streams
 * (row j at pf + j * pf_ld, pf_row bytes; pf NULL: none): the V rows the P·V pass reads next. */
typedef void (*fa_qk_f32_t)(const float *K, ptrdiff_t ldk, ptrdiff_t n, const float *Q,
                            ptrdiff_t D, ptrdiff_t R, float *S, ptrdiff_t lds,
                            const char *pf, ptrdiff_t pf_ld, ptrdiff_t pf_row);
typedef void (*fa_pv_f32_t)(const float *P, ptrdiff_t lds, ptrdiff_t R, ptrdiff_t n,
                            const float *V, ptrdiff_t ldv, ptrdiff_t Dv, float *acc);
/* float32 Q and sums, float16 K / V (F16C only: elsewhere the caller converts tiles first) */
typedef void (*fa_qk_f16_t)(const uint16_t *K, ptrdiff_t ldk, ptrdiff_t n, const float *Q,
                            ptrdiff_t D, ptrdiff_t R, float *S, ptrdiff_t lds,
                            const char *pf, ptrdiff_t pf_ld, ptrdiff_t pf_row);
typedef void (*fa_pv_f16_t)(const float *P, ptrdiff_t lds, ptrdiff_t R, ptrdiff_t n,
                            const uint16_t *V, ptrdiff_t ldv, ptrdiff_t Dv, float *acc);
typedef void (*fa_qk_f64_t)(const double *K, ptrdiff_t ldk, ptrdiff_t n, const double *Q,
                            ptrdiff_t D, ptrdiff_t R, double *S, ptrdiff_t lds,
                            const char *pf, ptrdiff_t pf_ld, ptrdiff_t pf_row);
typedef void (*fa_pv_f64_t)(const double *P, ptrdiff_t lds, ptrdiff_t R, ptrdiff_t n,
                            const double *V, ptrdiff_t ldv, ptrdiff_t Dv, double *acc);

/* One float16 value as float32 (exact): sign, exponent rebias, subnormals scaled. */
static inline float fa_half_to_float1(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13);              /* inf, NaN (payload kept) */
    } else if (e) {
        bits = sign | ((e + 112) << 23) | (m << 13);        /* normal */
    } else {
        float f = (float)m * 5.9604644775390625e-8f;        /* ±0, subnormal: m 2^-24 */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ---- plain C reference path ---------------------------------------------------------- */

static float fa_max_f32_scalar(const float *x, ptrdiff_t n) {
    float m = -INFINITY;
    for (ptrdiff_t i = 0; i < n; i++) if (x[i] > m) m = x[i];
    return m;
}

static double fa_max_f64_scalar(const double *x, ptrdiff_t n) {
    double m = -INFINITY;
    for (ptrdiff_t i = 0; i < n; i++) if (x[i] > m) m = x[i];
    return m;
}

static float fa_expsum_f32_scalar(float *x, ptrdiff_t n, float m, float k) {
    float s = 0.0f;
    for (ptrdiff_t i = 0; i < n; i++) { x[i] = expf((x[i] - m) * k); s += x[i]; }
    return s;
}

static double fa_expsum_f64_scalar(double *x, ptrdiff_t n, double m, double k) {
    double s = 0.0;
    for (ptrdiff_t i = 0; i < n; i++) { x[i] = exp((x[i] - m) * k); s += x[i]; }
    return s;
}

/* Few query rows against a stream of keys (decode): each K and V row is read once for all
 * R rows, where a GEMM would pack them first.
 *   qk: S[r, j] = Q[r, :] · K[j, :]             for r < R, j < n
 *   pv: acc[r, :] += Σ_j P[r, j] V[j, :]          terms with P == 0 skipped, so a hidden
 *                                                key's non-finite V row never leaks */
#define FA_STREAM_SCALAR(T, SUF)                                                           \
static void fa_qk_##SUF##_scalar(const T *K, ptrdiff_t ldk, ptrdiff_t n, const T *Q,        \
                                 ptrdiff_t D, ptrdiff_t R, T *S, ptrdiff_t lds,            \
                                 const char *pf, ptrdiff_t pf_ld, ptrdiff_t pf_row) {      \
    (void)pf; (void)pf_ld; (void)pf_row;          /* the reference path fetches nothing */ \
    for (ptrdiff_t j = 0; j < n; j++)                                                      \
        for (ptrdiff_t r = 0; r < R; r++) {                                                \
            T acc = 0;                                                                     \
            for (ptrdiff_t c = 0; c < D; c++) acc += Q[r * D + c] * K[j * ldk + c];         \
            S[r * lds + j] = acc;                                                          \
        }                                                                                  \
}                                                                                          \
                                                                                           \
static void fa_pv_##SUF##_scalar(const T *P, ptrdiff_t lds, ptrdiff_t R, ptrdiff_t n,       \
                                 const T *V, ptrdiff_t ldv, ptrdiff_t Dv, T *acc) {        \
    for (ptrdiff_t j = 0; j < n; j++)                                                      \
        for (ptrdiff_t r = 0; r < R; r++) {                                                \
            T p = P[r * lds + j];                                                          \
            if (p == 0) continue;                                                          \
            for (ptrdiff_t c = 0; c < Dv; c++) acc[r * Dv + c] += p * V[j * ldv + c];      \
        }                                                                                  \
}
FA_STREAM_SCALAR(float, f32)
FA_STREAM_SCALAR(double, f64)

/* ---- AVX2/FMA path --------------------------------------------------------------------- */

#ifdef FA_HAVE_X86
FA_AVX2 static float fa_max_f32_avx2(const float *x, ptrdiff_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY), m1 = m;     /* two chains: 64 bytes a step */
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    }
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    m = _mm256_max_ps(m, m1);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float r = _mm_cvtss_f32(h);
    for (; i < n; i++) if (x[i] > r) r = x[i];
    return r;
}

FA_AVX2 static double fa_max_f64_avx2(const double *x, ptrdiff_t n) {
    __m256d m = _mm256_set1_pd(-INFINITY);
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4) m = _mm256_max_pd(m, _mm256_loadu_pd(x + i));
    __m128d h = _mm_max_pd(_mm256_castpd256_pd128(m), _mm256_extractf128_pd(m, 1));
    h = _mm_max_sd(h, _mm_unpackhi_pd(h, h));
    double r = _mm_cvtsd_f64(h);
    for (; i < n; i++) if (x[i] > r) r = x[i];
    return r;
}

FA_AVX2 static float fa_expsum_f32_avx2(float *x, ptrdiff_t n, float m, float k) {
    const __m256 mv = _mm256_set1_ps(m), kv = _mm256_set1_ps(k);
    const int scaled = k != 1;          /* k = 1 (nearly always): no multiply on the FP pipes */
    __m256 s = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
        __m256 p = fa_exp8(scaled ? _mm256_mul_ps(d, kv) : d);
        _mm256_storeu_ps(x + i, p);
        s = _mm256_add_ps(s, p);
    }
    if (i < n) {  /* tail: masked load with -inf padding, masked store */
        __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)), lane);
        __m256 v = _mm256_maskload_ps(x + i, keep);
        v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(keep));
        __m256 p = fa_exp8(_mm256_mul_ps(_mm256_sub_ps(v, mv), kv));
        _mm256_maskstore_ps(x + i, keep, p);
        s = _mm256_add_ps(s, p);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

FA_AVX2 static double fa_expsum_f64_avx2(double *x, ptrdiff_t n, double m, double k) {
    const __m256d mv = _mm256_set1_pd(m), kv = _mm256_set1_pd(k);
    const int scaled = k != 1;
    __m256d s = _mm256_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d d = _mm256_sub_pd(_mm256_loadu_pd(x + i), mv);
        __m256d p = fa_exp4(scaled ? _mm256_mul_pd(d, kv) : d);
        _mm256_storeu_pd(x + i, p);
        s = _mm256_add_pd(s, p);
    }
    if (i < n) {
        __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
        __m256i keep = _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)(n - i)), lane);
        __m256d v = _mm256_maskload_pd(x + i, keep);
        v = _mm256_blendv_pd(_mm256_set1_pd(-INFINITY), v, _mm256_castsi256_pd(keep));
        __m256d p = fa_exp4(_mm256_mul_pd(_mm256_sub_pd(v, mv), kv));
        _mm256_maskstore_pd(x + i, keep, p);
        s = _mm256_add_pd(s, p);
    }
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    h = _mm_add_sd(h, _mm_unpackhi_pd(h, h));
    return _mm_cvtsd_f64(h);
}
#define FA_F16C __attribute__((target("avx2,fma,f16c")))

/* Every cache line of a row, into the cache.  (GCC 12 drops the prefetches of this loop
 * where the NULL test is inside it: callers test pf themselves.) */
static inline void fa_prefetch_bytes(const char *row, ptrdiff_t bytes) {
    for (ptrdiff_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

/* float32 Q·Kᵀ for few rows, generated for float32 K and, with F16C, for float16 K
 * converted as it is loaded (KT the stored type, LOADK eight of them as floats, KVAL one).
 *   rows4: S[r, j] = Q[r, :] · k for four rows: each vector of k is loaded once for the four
 *     rows (five loads per four FMAs, against two per FMA row by row), two accumulators a
 *     row, and the four sums reduced together.
 *   rows4x2: the four rows against two keys at once, one from each of the two streams
 *     below: each vector of Q loaded once for both keys (six loads per eight FMAs).
 *   row1x8: s[t] = q · K[t, :] for eight keys t, consecutive or (half > 0) four from each of
 *     two places half keys apart, in turn (FA_HALVES): the keys one after another, each into
 *     its own vector of partial sums, then the eight vectors reduced together into one
 *     vector of scores (no horizontal sum per key).
 *   row1: one row, one key: four accumulators, 32 features a step.
 *   The driver reads K in blocks of eight keys (no software prefetch of K: prefetching it
 *   4-32 rows ahead measured no better than noise on whole calls): the rows four at a time
 *   key by key, the other rows eight keys at a time; the last n % 8 keys one by one.  One
 *   row alone (its first n - n % 8 keys), and rows that all go four at a time, read K as
 *   two sequential streams, the two halves key by key in turn, which the hardware
 *   prefetchers keep further ahead than one stream (C harness, 1 thread, 512 MB of K, D =
 *   128, chunks of 2048 keys: 18.6-19.8 -> 20.5-24 GB/s; one row's scores are as before,
 *   bit for bit, rows4x2 orders each sum its own way).  With each key of the first pass it
 *   fetches the same row of V (pf), so that the P·V pass after the softmax reads V from
 *   cache: the two streams then run while this pass computes, instead of the P·V pass
 *   waiting on memory alone.  C harness (-O3, 1 thread, 128 MB each of K and V, D = 128,
 *   chunks of 256 keys): four rows 11.4 -> 16.5 GB/s together with the register-blocked P·V
 *   below (which alone, V not fetched ahead, was slower: 10.3 GB/s).  Fetching V's rows for
 *   a block of eight keys at once, instead of key by key, made two and three rows slower
 *   than before (the P·V pass fetching V itself). */
/* The i-th key visited (i < 2 half) when keys [0, 2 half) are read as two streams, their two
 * halves key by key in turn; i itself when half is 0 (one stream). */
#define FA_HALVES(i, half) ((half) ? ((i) >> 1) + ((i) & 1) * (half) : (i))
#define FA_QK_F32(ATTR, SUF, KT, LOADK, KVAL)                                              \
ATTR static inline void fa_qk_##SUF##_rows4(const KT *k, const float *Q, ptrdiff_t D,       \
                                            float *s, ptrdiff_t lds) {                     \
    ptrdiff_t D16 = D & ~(ptrdiff_t)15, D8 = D & ~(ptrdiff_t)7, c = 0;                     \
    __m256 a[4], b[4];                                                                     \
    for (int r = 0; r < 4; r++) a[r] = b[r] = _mm256_setzero_ps();                         \
    for (; c < D16; c += 16) {                                                             \
        __m256 kx = LOADK(k + c), ky = LOADK(k + c + 8);                                   \
        for (int r = 0; r < 4; r++) {                                                      \
            a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + r * D + c), kx, a[r]);              \
            b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + r * D + c + 8), ky, b[r]);          \
        }                                                                                  \
    }                                                                                      \
    if (c < D8) {                                                                          \
        __m256 kx = LOADK(k + c);                                                          \
        for (int r = 0; r < 4; r++)                                                        \
            a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + r * D + c), kx, a[r]);              \
        c += 8;                                                                            \
    }                                                                                      \
    /* lane r of h: row r's sum */                                                         \
    for (int r = 0; r < 4; r++) a[r] = _mm256_add_ps(a[r], b[r]);                          \
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));     \
    float t[4];                                                                            \
    _mm_storeu_ps(t, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));  \
    for (; c < D; c++)                      /* the last D % 8 features */                  \
        for (int r = 0; r < 4; r++) t[r] += Q[r * D + c] * KVAL(k[c]);                     \
    for (int r = 0; r < 4; r++) s[r * lds] = t[r];                                         \
}                                                                                          \
                                                                                           \
ATTR static inline void fa_qk_##SUF##_rows4x2(const KT *k0, const KT *k1, const float *Q,   \
                                              ptrdiff_t D, float *s0, float *s1,          \
                                              ptrdiff_t lds) {                            \
    ptrdiff_t D8 = D & ~(ptrdiff_t)7, c = 0;                                               \
    __m256 a[4], b[4];                                                                     \
    for (int r = 0; r < 4; r++) a[r] = b[r] = _mm256_setzero_ps();                         \
    for (; c < D8; c += 8) {                                                               \
        __m256 kx = LOADK(k0 + c), ky = LOADK(k1 + c);                                     \
        for (int r = 0; r < 4; r++) {                                                      \
            __m256 q = _mm256_loadu_ps(Q + r * D + c);                                     \
            a[r] = _mm256_fmadd_ps(q, kx, a[r]);                                           \
            b[r] = _mm256_fmadd_ps(q, ky, b[r]);                                           \
        }                                                                                  \
    }                                                                                      \
    /* lanes 0-3: the four rows' sums against k0, lanes 4-7: against k1 */                 \
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));     \
    __m256 g = _mm256_hadd_ps(_mm256_hadd_ps(b[0], b[1]), _mm256_hadd_ps(b[2], b[3]));     \
    float t[8];                                                                            \
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_permute2f128_ps(h, g, 0x20),                  \
                                      _mm256_permute2f128_ps(h, g, 0x31)));                \
    for (; c < D; c++)                      /* the last D % 8 features */                  \
        for (int r = 0; r < 4; r++) {                                                      \
            t[r] += Q[r * D + c] * KVAL(k0[c]);                                            \
            t[4 + r] += Q[r * D + c] * KVAL(k1[c]);                                        \
        }                                                                                  \
    for (int r = 0; r < 4; r++) {                                                          \
        s0[r * lds] = t[r];                                                                \
        s1[r * lds] = t[4 + r];                                                            \
    }                                                                                      \
}                                                                                          \
                                                                                           \
ATTR static inline void fa_qk_##SUF##_row1x8(const KT *K, ptrdiff_t ldk, const float *q,    \
                                             ptrdiff_t D, float *s, const char *pf,        \
                                             ptrdiff_t pf_ld, ptrdiff_t pf_row,            \
                                             ptrdiff_t half) {                             \
    ptrdiff_t D16 = D & ~(ptrdiff_t)15, D8 = D & ~(ptrdiff_t)7;                            \
    __m256 a[8];                                                                           \
    for (int t = 0; t < 8; t++) {                                                          \
        const KT *k = K + FA_HALVES(t, half) * ldk;                                        \
        if (pf) fa_prefetch_bytes(pf + t * pf_ld, pf_row);                                 \
        __m256 x = _mm256_setzero_ps(), y = x;                                             \
        ptrdiff_t c = 0;                                                                   \
        for (; c < D16; c += 16) {                                                         \
            x = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), LOADK(k + c), x);                  \
            y = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), LOADK(k + c + 8), y);          \
        }                                                                                  \
        if (c < D8) x = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), LOADK(k + c), x);          \
        a[t] = _mm256_add_ps(x, y);                                                        \
    }                                                                                      \
    /* g0: keys 0-3 (each 128-bit half holds half of every key's sum), g1: keys 4-7 */     \
    __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));    \
    __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));    \
    __m256 g = _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20),                         \
                             _mm256_permute2f128_ps(g0, g1, 0x31));                        \
    if (!half) {                                                                           \
        _mm256_storeu_ps(s, g);                                                            \
    } else {                                                                               \
        float tmp[8];                                                                      \
        _mm256_storeu_ps(tmp, g);                                                          \
        for (int t = 0; t < 8; t++) s[FA_HALVES(t, half)] = tmp[t];                        \
    }                                                                                      \
    for (ptrdiff_t c = D8; c < D; c++)      /* the last D % 8 features */                  \
        for (int t = 0; t < 8; t++)                                                        \
            s[FA_HALVES(t, half)] += q[c] * KVAL(K[FA_HALVES(t, half) * ldk + c]);         \
}                                                                                          \
                                                                                           \
ATTR static inline float fa_qk_##SUF##_row1(const KT *k, const float *q, ptrdiff_t D) {     \
    ptrdiff_t D32 = D & ~(ptrdiff_t)31, D8 = D & ~(ptrdiff_t)7, c = 0;                     \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
    for (; c < D32; c += 32) {                                                             \
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), LOADK(k + c), a0);                    \
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), LOADK(k + c + 8), a1);            \
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 16), LOADK(k + c + 16), a2);          \
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 24), LOADK(k + c + 24), a3);          \
    }                                                                                      \
    for (; c < D8; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), LOADK(k + c), a0);  \
    float acc = fa_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));     \
    for (; c < D; c++) acc += q[c] * KVAL(k[c]);                                           \
    return acc;                                                                            \
}                                                                                          \
                                                                                           \
ATTR static void fa_qk_##SUF##_avx2(const KT *K, ptrdiff_t ldk, ptrdiff_t n, const float *Q, \
                                    ptrdiff_t D, ptrdiff_t R, float *S, ptrdiff_t lds,     \
                                    const char *pf, ptrdiff_t pf_ld, ptrdiff_t pf_row) {   \
    ptrdiff_t R4 = R & ~(ptrdiff_t)3, j = 0;                                               \
    if (R == 1 && !pf) {                  /* two streams: halves of the first n8 keys */   \
        ptrdiff_t half = n / 8 * 4;                                                        \
        for (; j < half; j += 4)                                                           \
            fa_qk_##SUF##_row1x8(K + j * ldk, ldk, Q, D, S + j, NULL, 0, 0, half);         \
        j = 2 * half;                                                                      \
    }                                                                                      \
    if (R == R4) {                        /* rows four at a time: two streams, rows4x2 */  \
        ptrdiff_t half = n / 2;                                                            \
        for (ptrdiff_t t = 0; t < half; t++) {                                             \
            if (pf) {                                                                      \
                fa_prefetch_bytes(pf + t * pf_ld, pf_row);                                 \
                fa_prefetch_bytes(pf + (half + t) * pf_ld, pf_row);                        \
            }                                                                              \
            for (ptrdiff_t r = 0; r < R4; r += 4)                                          \
                fa_qk_##SUF##_rows4x2(K + t * ldk, K + (half + t) * ldk, Q + r * D, D,     \
                                      S + r * lds + t, S + r * lds + half + t, lds);       \
        }                                                                                  \
        j = 2 * half;                                                                      \
    }                                                                                      \
    for (; j + 8 <= n; j += 8) {                                                           \
        const KT *k = K + j * ldk;                                                         \
        const char *pfj = pf ? pf + j * pf_ld : NULL;                                     \
        for (int t = 0; R4 && t < 8; t++) {                                                \
            if (pfj) fa_prefetch_bytes(pfj + t * pf_ld, pf_row);                           \
            for (ptrdiff_t r = 0; r < R4; r += 4)                                          \
                fa_qk_##SUF##_rows4(k + t * ldk, Q + r * D, D, S + r * lds + j + t, lds);  \
        }                                                                                  \
        for (ptrdiff_t r = R4; r < R; r++)    /* no four-row pass: the first row fetches V */ \
            fa_qk_##SUF##_row1x8(k, ldk, Q + r * D, D, S + r * lds + j,                    \
                                 !R4 && r == 0 ? pfj : NULL, pf_ld, pf_row, 0);            \
    }                                                                                      \
    for (; j < n; j++) {                                                                   \
        const KT *k = K + j * ldk;                                                         \
        ptrdiff_t r = 0;                                                                   \
        if (pf) fa_prefetch_bytes(pf + j * pf_ld, pf_row);                               \
        for (; r < R4; r += 4) fa_qk_##SUF##_rows4(k, Q + r * D, D, S + r * lds + j, lds);  \
        for (; r < R; r++) S[r * lds + j] = fa_qk_##SUF##_row1(k, Q + r * D, D);           \
    }                                                                                      \
}

#define FA_LOAD8_F32(p) _mm256_loadu_ps(p)
#define FA_LOAD8_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define FA_AS_IS(x) (x)
FA_QK_F32(FA_AVX2, f32, float, FA_LOAD8_F32, FA_AS_IS)
FA_QK_F32(FA_F16C, f16, uint16_t, FA_LOAD8_F16, fa_half_to_float1)

/* float64 Q·Kᵀ for few rows: as the float32 kernels above, with four doubles a vector. */
FA_AVX2 static inline __m256d fa_hadd4x4d(__m256d a0, __m256d a1, __m256d a2, __m256d a3) {
    __m256d h0 = _mm256_hadd_pd(a0, a1), h1 = _mm256_hadd_pd(a2, a3);   /* [sums of pairs] */
    return _mm256_add_pd(_mm256_permute2f128_pd(h0, h1, 0x20),
                         _mm256_permute2f128_pd(h0, h1, 0x31));         /* [a0 a1 a2 a3] */
}

FA_AVX2 static inline void fa_qk_f64_rows4(const double *k, const double *Q, ptrdiff_t D,
                                           double *s, ptrdiff_t lds) {
    ptrdiff_t D8 = D & ~(ptrdiff_t)7, D4 = D & ~(ptrdiff_t)3, c = 0;
    __m256d a[4], b[4];
    for (int r = 0; r < 4; r++) a[r] = b[r] = _mm256_setzero_pd();
    for (; c < D8; c += 8) {
        __m256d kx = _mm256_loadu_pd(k + c), ky = _mm256_loadu_pd(k + c + 4);
        for (int r = 0; r < 4; r++) {
            a[r] = _mm256_fmadd_pd(_mm256_loadu_pd(Q + r * D + c), kx, a[r]);
            b[r] = _mm256_fmadd_pd(_mm256_loadu_pd(Q + r * D + c + 4), ky, b[r]);
        }
    }
    if (c < D4) {
        __m256d kx = _mm256_loadu_pd(k + c);
        for (int r = 0; r < 4; r++)
            a[r] = _mm256_fmadd_pd(_mm256_loadu_pd(Q + r * D + c), kx, a[r]);
        c += 4;
    }
    for (int r = 0; r < 4; r++) a[r] = _mm256_add_pd(a[r], b[r]);
    double t[4];
    _mm256_storeu_pd(t, fa_hadd4x4d(a[0], a[1], a[2], a[3]));
    for (; c < D; c++)                      /* the last D % 4 features */
        for (int r = 0; r < 4; r++) t[r] += Q[r * D + c] * k[c];
    for (int r = 0; r < 4; r++) s[r * lds] = t[r];
}

FA_AVX2 static inline void fa_qk_f64_row1x4(const double *K, ptrdiff_t ldk, const double *q,
                                            ptrdiff_t D, double *s, const char *pf,
                                            ptrdiff_t pf_ld, ptrdiff_t pf_row) {
    ptrdiff_t D8 = D & ~(ptrdiff_t)7, D4 = D & ~(ptrdiff_t)3;
    __m256d a[4];
    for (int t = 0; t < 4; t++) {
        const double *k = K + t * ldk;
        if (pf) fa_prefetch_bytes(pf + t * pf_ld, pf_row);
        __m256d x = _mm256_setzero_pd(), y = x;
        ptrdiff_t c = 0;
        for (; c < D8; c += 8) {
            x = _mm256_fmadd_pd(_mm256_loadu_pd(q + c), _mm256_loadu_pd(k + c), x);
            y = _mm256_fmadd_pd(_mm256_loadu_pd(q + c + 4), _mm256_loadu_pd(k + c + 4), y);
        }
        if (c < D4) x = _mm256_fmadd_pd(_mm256_loadu_pd(q + c), _mm256_loadu_pd(k + c), x);
        a[t] = _mm256_add_pd(x, y);
    }
    _mm256_storeu_pd(s, fa_hadd4x4d(a[0], a[1], a[2], a[3]));
    for (ptrdiff_t c = D4; c < D; c++)
        for (int t = 0; t < 4; t++) s[t] += q[c] * K[t * ldk + c];
}

FA_AVX2 static void fa_qk_f64_avx2(const double *K, ptrdiff_t ldk, ptrdiff_t n,
                                   const double *Q, ptrdiff_t D, ptrdiff_t R, double *S,
                                   ptrdiff_t lds, const char *pf, ptrdiff_t pf_ld,
                                   ptrdiff_t pf_row) {
    ptrdiff_t R4 = R & ~(ptrdiff_t)3, j = 0;
    for (; j + 4 <= n; j += 4) {
        const double *k = K + j * ldk;
        const char *pfj = pf ? pf + j * pf_ld : NULL;
        for (int t = 0; R4 && t < 4; t++) {
            if (pfj) fa_prefetch_bytes(pfj + t * pf_ld, pf_row);
            for (ptrdiff_t r = 0; r < R4; r += 4)
                fa_qk_f64_rows4(k + t * ldk, Q + r * D, D, S + r * lds + j + t, lds);
        }
        for (ptrdiff_t r = R4; r < R; r++)    /* no four-row pass: the first row fetches V */
            fa_qk_f64_row1x4(k, ldk, Q + r * D, D, S + r * lds + j,
                             !R4 && r == 0 ? pfj : NULL, pf_ld, pf_row);
    }
    for (; j < n; j++) {                    /* the last n % 4 keys: plain dot products */
        const double *k = K + j * ldk;
        if (pf) fa_prefetch_bytes(pf + j * pf_ld, pf_row);
        for (ptrdiff_t r = 0; r < R; r++) {
            double acc = 0;
            for (ptrdiff_t c = 0; c < D; c++) acc += Q[r * D + c] * k[c];
            S[r * lds + j] = acc;
        }
    }
}

/* o[0 : L W] += Σ_j p[j] V[j, 0 : L W] (L lanes a vector), the W accumulators in registers
 * (W fixed, so the compiler unrolls them); terms with p[j] == 0 skipped.
 * T: the type of P and of the sums; VS: V's stored type, LOADV loading L of them as T,
 * VVAL one; PS: the intrinsics' suffix (ps, pd). */
#define FA_PV_BLOCK(ATTR, T, VS, SUF, PS, VT, L, LOADV, W)                                 \
ATTR static inline void fa_pv_##SUF##_block##W(const T *p, ptrdiff_t n, const VS *V,        \
                                               ptrdiff_t ldv, T *o, ptrdiff_t half) {      \
    VT a[W];                                                                               \
    for (int t = 0; t < W; t++) a[t] = _mm256_loadu_##PS(o + L * t);                       \
    for (ptrdiff_t i = 0; i < n; i++) {                                                    \
        ptrdiff_t j = i < 2 * half ? FA_HALVES(i, half) : i;                               \
        if (p[j] == 0) continue;                                                           \
        VT pv = _mm256_set1_##PS(p[j]);                                                    \
        const VS *v = V + j * ldv;                                                         \
        for (int t = 0; t < W; t++)                                                        \
            a[t] = _mm256_fmadd_##PS(pv, LOADV(v + L * t), a[t]);                          \
    }                                                                                      \
    for (int t = 0; t < W; t++) _mm256_storeu_##PS(o + L * t, a[t]);                       \
}

/* o[r, 0 : 2L] += Σ_j p[r lds + j] V[j, 0 : 2L] for N rows at once (o's rows ldo apart):
 * 2N accumulators in registers, each V vector loaded once for the N rows. */
#define FA_PV_ROWS(ATTR, T, VS, SUF, PS, VT, L, LOADV, N)                                  \
ATTR static inline void fa_pv_##SUF##_rows##N(const T *p, ptrdiff_t lds, ptrdiff_t n,       \
                                              const VS *V, ptrdiff_t ldv, T *o,            \
                                              ptrdiff_t ldo) {                             \
    VT a[N], b[N];                                                                         \
    for (int r = 0; r < N; r++) {                                                          \
        a[r] = _mm256_loadu_##PS(o + r * ldo);                                             \
        b[r] = _mm256_loadu_##PS(o + r * ldo + L);                                         \
    }                                                                                      \
    for (ptrdiff_t j = 0; j < n; j++) {                                                    \
        VT x = LOADV(V + j * ldv), y = LOADV(V + j * ldv + L);                             \
        for (int r = 0; r < N; r++) {                                                      \
            VT pv = _mm256_set1_##PS(p[r * lds + j]);                                      \
            a[r] = _mm256_fmadd_##PS(pv, x, a[r]);                                         \
            b[r] = _mm256_fmadd_##PS(pv, y, b[r]);                                         \
        }                                                                                  \
    }                                                                                      \
    for (int r = 0; r < N; r++) {                                                          \
        _mm256_storeu_##PS(o + r * ldo, a[r]);                                             \
        _mm256_storeu_##PS(o + r * ldo + L, b[r]);                                         \
    }                                                                                      \
}

/* V bytes a block of keys may span so that it stays in L1 through all the passes over it
 * (the rows' and the column blocks'). */
#ifndef FA_PV_L1_BYTES
#define FA_PV_L1_BYTES 16384
#endif

/* acc[r, :] += Σ_j P[r, j] V[j, :], V already in cache (the Q·Kᵀ pass fetched it).
 *   rows2-4: up to four rows at once, two vectors of columns at a time (FA_PV_ROWS): for
 *     four rows six loads per eight FMAs (row by row it is 17 per 16, and a block of 16
 *     accumulators leaves no register free).  C harness (-O3, 1 thread, V in cache, Dv =
 *     128): 23.4 -> 12.7 ns a key for four rows.  Only where none of the rows' P in the key
 *     block is 0: a hidden key's V row may hold inf or NaN, and 0 · inf is NaN.
 *   row: one row from column c0 on, 16 vectors of columns at a time in registers, then 8,
 *     4, 2, 1, then the last Dv % L columns in plain C; P == 0 terms skipped.  One row with
 *     Dv = 128 is one pass (one block of 16), V read as two sequential streams: the halves
 *     of the keys, key by key in turn (half > 0), as the one-row Q·Kᵀ reads K.
 * With more than one pass over V (several rows, or more than one block of columns), the
 * keys go in blocks of FA_PV_L1_BYTES of V, every pass over a block before the next block. */
#define FA_PV(ATTR, T, VS, SUF, PS, VT, L, LOADV, VVAL)                                    \
FA_PV_BLOCK(ATTR, T, VS, SUF, PS, VT, L, LOADV, 16)                                        \
FA_PV_BLOCK(ATTR, T, VS, SUF, PS, VT, L, LOADV, 8)                                         \
FA_PV_BLOCK(ATTR, T, VS, SUF, PS, VT, L, LOADV, 4)                                         \
FA_PV_BLOCK(ATTR, T, VS, SUF, PS, VT, L, LOADV, 2)                                         \
FA_PV_BLOCK(ATTR, T, VS, SUF, PS, VT, L, LOADV, 1)                                         \
FA_PV_ROWS(ATTR, T, VS, SUF, PS, VT, L, LOADV, 4)                                         \
FA_PV_ROWS(ATTR, T, VS, SUF, PS, VT, L, LOADV, 3)                                         \
FA_PV_ROWS(ATTR, T, VS, SUF, PS, VT, L, LOADV, 2)                                         \
ATTR static inline void fa_pv_##SUF##_row(const T *p, ptrdiff_t n, const VS *V,             \
                                          ptrdiff_t ldv, ptrdiff_t Dv, T *o, ptrdiff_t c0, \
                                          ptrdiff_t half) {                                \
    for (; c0 + 16 * L <= Dv; c0 += 16 * L)                                                \
        fa_pv_##SUF##_block16(p, n, V + c0, ldv, o + c0, half);                            \
    if (c0 + 8 * L <= Dv) { fa_pv_##SUF##_block8(p, n, V + c0, ldv, o + c0, half); c0 += 8 * L; } \
    if (c0 + 4 * L <= Dv) { fa_pv_##SUF##_block4(p, n, V + c0, ldv, o + c0, half); c0 += 4 * L; } \
    if (c0 + 2 * L <= Dv) { fa_pv_##SUF##_block2(p, n, V + c0, ldv, o + c0, half); c0 += 2 * L; } \
    if (c0 + L <= Dv) { fa_pv_##SUF##_block1(p, n, V + c0, ldv, o + c0, half); c0 += L; }  \
    for (ptrdiff_t c = c0; c < Dv; c++) {   /* columns past the last full vector */        \
        T s = o[c];                                                                        \
        for (ptrdiff_t j = 0; j < n; j++)                                                  \
            if (p[j] != 0) s += p[j] * VVAL(V[j * ldv + c]);                               \
        o[c] = s;                                                                          \
    }                                                                                      \
}                                                                                          \
                                                                                           \
ATTR static void fa_pv_##SUF##_avx2(const T *P, ptrdiff_t lds, ptrdiff_t R, ptrdiff_t n,    \
                                    const VS *V, ptrdiff_t ldv, ptrdiff_t Dv, T *acc) {    \
    ptrdiff_t nb = n, nv = Dv / L;                                                         \
    int passes = (int)(nv / 16) + !!(nv & 8) + !!(nv & 4) + !!(nv & 2) + !!(nv & 1)       \
                 + (Dv % L != 0);                                                          \
    if (R > 1 || passes > 1) {                                                             \
        nb = FA_PV_L1_BYTES / (Dv * (ptrdiff_t)sizeof(VS));                                \
        if (nb < 8) nb = 8;                                                                \
    }                                                                                      \
    for (ptrdiff_t j0 = 0; j0 < n; j0 += nb) {                                             \
        ptrdiff_t m = n - j0 < nb ? n - j0 : nb, r = 0;                                    \
        const VS *Vb = V + j0 * ldv;                                                       \
        while (r < R) {                                                                    \
            const T *p = P + r * lds + j0;                                                 \
            T *o = acc + r * Dv;                                                           \
            ptrdiff_t g = R - r < 4 ? R - r : 4;      /* rows in this group */             \
            int dense = g > 1 && Dv >= 2 * L;                                              \
            for (ptrdiff_t i = 0; dense && i < g; i++)                                     \
                for (ptrdiff_t j = 0; j < m; j++) dense &= p[i * lds + j] != 0;            \
            if (!dense) {                                                                  \
                fa_pv_##SUF##_row(p, m, Vb, ldv, Dv, o, 0, R == 1 && passes == 1 ? m / 2 : 0); \
                r++;                                                                       \
                continue;                                                                  \
            }                                                                              \
            ptrdiff_t c0 = 0;                                                              \
            for (; c0 + 2 * L <= Dv; c0 += 2 * L) {                                        \
                if (g == 4) fa_pv_##SUF##_rows4(p, lds, m, Vb + c0, ldv, o + c0, Dv);      \
                else if (g == 3) fa_pv_##SUF##_rows3(p, lds, m, Vb + c0, ldv, o + c0, Dv); \
                else fa_pv_##SUF##_rows2(p, lds, m, Vb + c0, ldv, o + c0, Dv);             \
            }                                                                              \
            for (ptrdiff_t i = 0; i < g && c0 < Dv; i++)  /* the last Dv % 2L columns */   \
                fa_pv_##SUF##_row(p + i * lds, m, Vb, ldv, Dv, o + i * Dv, c0, 0);         \
            r += g;                                                                        \
        }                                                                                  \
    }                                                                                      \
}
#define FA_LOAD4_F64(p) _mm256_loadu_pd(p)
FA_PV(FA_AVX2, float, float, f32, ps, __m256, 8, FA_LOAD8_F32, FA_AS_IS)
FA_PV(FA_AVX2, double, double, f64, pd, __m256d, 4, FA_LOAD4_F64, FA_AS_IS)
FA_PV(FA_F16C, float, uint16_t, f16, ps, __m256, 8, FA_LOAD8_F16, fa_half_to_float1)

/* float16 <-> float32 for whole contiguous arrays (F16C); round to nearest even, as NumPy. */
__attribute__((target("avx2,f16c"))) static void fa_h2f_f16c(const uint16_t *src, float *dst,
                                                              ptrdiff_t n) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx2,f16c"))) static void fa_f2h_f16c(const float *src, uint16_t *dst,
                                                              ptrdiff_t n) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif  /* x86-64 */

/* ---- run-time dispatch ----------------------------------------------------------------- */

static fa_max_f32_t fa_max_f32 = fa_max_f32_scalar;
static fa_max_f64_t fa_max_f64 = fa_max_f64_scalar;
static fa_expsum_f32_t fa_expsum_f32 = fa_expsum_f32_scalar;
static fa_expsum_f64_t fa_expsum_f64 = fa_expsum_f64_scalar;
static fa_qk_f32_t fa_qk_f32 = fa_qk_f32_scalar;
static fa_pv_f32_t fa_pv_f32 = fa_pv_f32_scalar;
static fa_qk_f64_t fa_qk_f64 = fa_qk_f64_scalar;
static fa_pv_f64_t fa_pv_f64 = fa_pv_f64_scalar;
static fa_qk_f16_t fa_qk_f16 = NULL;
static fa_pv_f16_t fa_pv_f16 = NULL;
static int fa_f16_stream_ok = 0;
static const char *fa_simd_name = "scalar";
static int fa_have_f16c = 0;

/* Returns 0 (nothing done) where the CPU has no F16C: the caller converts another way. */
static int fa_half_to_float(const uint16_t *src, float *dst, ptrdiff_t n) {
#ifdef FA_HAVE_X86
    if (fa_have_f16c) { fa_h2f_f16c(src, dst, n); return 1; }
#endif
    (void)src; (void)dst; (void)n;
    return 0;
}

static int fa_float_to_half(const float *src, uint16_t *dst, ptrdiff_t n) {
#ifdef FA_HAVE_X86
    if (fa_have_f16c) { fa_f2h_f16c(src, dst, n); return 1; }
#endif
    (void)src; (void)dst; (void)n;
    return 0;
}

/* dst (n x width, contiguous) = rows [0, n) of src (row stride ld) as float32 */
static void fa_half_rows_to_float(const uint16_t *src, ptrdiff_t ld, ptrdiff_t n,
                                  ptrdiff_t width, float *dst) {
    for (ptrdiff_t j = 0; j < n; j++) {
        const uint16_t *s = src + j * ld;
        float *d = dst + j * width;
        if (!fa_half_to_float(s, d, width))
            for (ptrdiff_t c = 0; c < width; c++) d[c] = fa_half_to_float1(s[c]);
    }
}

/* use_simd = 0 forces the plain C path (tests compare the two). Returns the path's name. */
static const char *fa_simd_init(int use_simd) {
    fa_max_f32 = fa_max_f32_scalar;
    fa_max_f64 = fa_max_f64_scalar;
    fa_expsum_f32 = fa_expsum_f32_scalar;
    fa_expsum_f64 = fa_expsum_f64_scalar;
    fa_qk_f32 = fa_qk_f32_scalar;
    fa_pv_f32 = fa_pv_f32_scalar;
    fa_qk_f64 = fa_qk_f64_scalar;
    fa_pv_f64 = fa_pv_f64_scalar;
    fa_qk_f16 = NULL;
    fa_pv_f16 = NULL;
    fa_f16_stream_ok = 0;
    fa_simd_name = "scalar";
    fa_have_f16c = 0;
    fa_gemm_ok = 0;
#ifdef FA_HAVE_X86
    if (use_simd) {
        __builtin_cpu_init();
        fa_have_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            fa_max_f32 = fa_max_f32_avx2;
            fa_max_f64 = fa_max_f64_avx2;
            fa_expsum_f32 = fa_expsum_f32_avx2;
            fa_expsum_f64 = fa_expsum_f64_avx2;
            fa_qk_f32 = fa_qk_f32_avx2;
            fa_pv_f32 = fa_pv_f32_avx2;
            fa_qk_f64 = fa_qk_f64_avx2;
            fa_pv_f64 = fa_pv_f64_avx2;
            if (fa_have_f16c) {
                fa_qk_f16 = fa_qk_f16_avx2;
                fa_pv_f16 = fa_pv_f16_avx2;
                fa_f16_stream_ok = 1;
            }
            fa_gemm_ok = 1;
            fa_simd_name = "avx2+fma";
        }
    }
#else
    (void)use_simd;
#endif
    return fa_simd_name;
}

#endif  /* FASTATTN_SIMD_H */
