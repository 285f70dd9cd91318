/* Vector math primitives shared by fastattn's extensions: exp for 8 floats / 4 doubles and a
 * horizontal sum, compiled for AVX2/FMA with a function-level target attribute (callers
 * choose them at run time; nothing here needs -march).  exp(-inf) is exactly 0 and NaN
 * propagates; nothing assumes -ffast-math.
 */
#ifndef FASTATTN_VECMATH_H
#define FASTATTN_VECMATH_H

/* each extension that includes these headers uses only some of their static functions */
#if defined(__GNUC__) || defined(__clang__)
#define FA_UNUSED __attribute__((unused))
#else
#define FA_UNUSED
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FA_HAVE_X86 1
#include <immintrin.h>

#define FA_AVX2 __attribute__((target("avx2,fma"))) FA_UNUSED

/* exp(x) = 2^n exp(r), x = n ln2 + r, |r| <= ln2/2.  n comes from the "magic number" add:
 * x log2e + (1.5 2^23 + bias) holds n + bias in its low mantissa bits, so shifting those bits
 * into the exponent field gives 2^n with no round or convert instruction, and subtracting the
 * constant back gives n as a float.  exp(r) = 1 + r q(r), q a near-minimax polynomial
 * (Chebyshev-node fit for the relative error on |r| <= ln2/2), and exp(x) = s + (r s) q with
 * s = 2^n.  Inputs are clamped from above to 88 (709 for doubles), where 2^n still has a
 * finite exponent (the softmax only passes x <= 0; GELU's tanh only needs saturation).
 * Below the underflow threshold (and at -inf) the result is exactly 0.  NaN propagates: the
 * min keeps its second operand, x, when it is NaN, and the comparison is false for NaN. */

/* 8 floats: degree 6, 1.5 ulp at most (measured over a dense grid of [-87.3, 0]) */
FA_AVX2 static inline __m256 fa_exp8(__m256 x) {
    const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);        /* 1.5 2^23 + bias */
    const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
    __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    __m256 nb = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(nb), 23));
    __m256 n = _mm256_sub_ps(nb, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);  /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 q = _mm256_set1_ps(1.3843653723597527e-3f);
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.37415549904108e-3f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.166800156235695e-2f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666431725025177e-1f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.999999403953552e-1f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
    __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(r, s), q, s);
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}

/* 4 doubles: degree 11, truncation error 1.7e-17 (0.15 ulp); 0.7 ulp at most measured */
FA_AVX2 static inline __m256d fa_exp4(__m256d x) {
    static const double c[11] = {1.0, 0.5000000000000019, 0.1666666666666668,
                                 0.0416666666664881, 0.008333333333319601,
                                 0.0013888888952314775, 0.00019841269890047113,
                                 2.4801485482328494e-05, 2.755724091857897e-06,
                                 2.763263963904103e-07, 2.5110037605963777e-08};
    const __m256d magic = _mm256_set1_pd(6755399441055744.0 + 1023.0);  /* 1.5 2^52 + bias */
    const __m256d lo = _mm256_set1_pd(-708.0);
    __m256d xc = _mm256_min_pd(_mm256_set1_pd(709.0), x);
    __m256d nb = _mm256_fmadd_pd(xc, _mm256_set1_pd(1.4426950408889634), magic);
    __m256d s = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_castpd_si256(nb), 52));
    __m256d n = _mm256_sub_pd(nb, magic);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93145751953125e-1), xc);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.42860682030941723212e-6), r);
    __m256d q = _mm256_set1_pd(c[10]);
    for (int j = 9; j >= 0; j--) q = _mm256_fmadd_pd(q, r, _mm256_set1_pd(c[j]));
    __m256d y = _mm256_fmadd_pd(_mm256_mul_pd(r, s), q, s);
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
