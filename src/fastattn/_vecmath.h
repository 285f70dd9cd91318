/* Vector math primitives shared by fastattn's extensions: exp for 8 floats / 4 doubles and a
 * horizontal sum, compiled for AVX2/FMA with a function-level target attribute (callers
 * choose them at run time; nothing here needs -march).  exp(-inf) is exactly 0 and NaN
 * propagates; nothing assumes -ffast-math.
 */
#ifndef FASTATTN_VECMATH_H
#define FASTATTN_VECMATH_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FA_HAVE_X86 1
#include <immintrin.h>

#define FA_AVX2 __attribute__((target("avx2,fma")))

/* exp(x) for 8 floats: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial
 * (Cephes coefficients, max rel. error ~1.5 ulp), times 2^n built in the exponent bits.
 * Inputs below -87.33 give 0 (float32 underflow, and exactly 0 for -inf); NaN stays NaN
 * (the min/max keep their second operand, x, when it is NaN). */
FA_AVX2 static inline __m256 fa_exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
    __m256 xc = _mm256_min_ps(hi, x);
    xc = _mm256_max_ps(lo, xc);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    /* x < lo (including -inf) gives exactly 0 */
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}

/* exp(x) for 4 doubles: same reduction with a degree-13 Taylor polynomial on
 * |r| <= ln2/2 (truncation error < 5e-18, below half an ulp), 2^n from the exponent bits. */
FA_AVX2 static inline __m256d fa_exp4(__m256d x) {
    const __m256d hi = _mm256_set1_pd(709.0);
    const __m256d lo = _mm256_set1_pd(-708.0);
    __m256d xc = _mm256_min_pd(hi, x);
    xc = _mm256_max_pd(lo, xc);
    __m256d n = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(1.4426950408889634)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93145751953125e-1), xc);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.42860682030941723212e-6), r);
    __m256d p = _mm256_set1_pd(1.0 / 6227020800.0);
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 479001600.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 39916800.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 3628800.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 362880.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 40320.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 5040.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 720.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 120.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 24.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 6.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(0.5));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
    __m128i n32 = _mm256_cvtpd_epi32(n);
    __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(n32),
                                                   _mm256_set1_epi64x(1023)), 52);
    __m256d y = _mm256_mul_pd(p, _mm256_castsi256_pd(e));
    return _mm256_andnot_pd(_mm256_cmp_pd(x, lo, _CMP_LT_OQ), y);
}

FA_AVX2 static inline float fa_hsum8(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#endif  /* x86-64 */

#endif  /* FASTATTN_VECMATH_H */
