# Flash-style attention kernel: tiles of Q·Kᵀ and P·V with an online softmax between them.
#
# Everything here runs without the GIL.  Policy (dtype promotion, broadcasting, validation,
# block sizes, thread counts) is decided in Python (_attention.py) and handed over in a
# `Problem` struct; this file only walks the loop nest:
#
#   for each work item (batch b, KV head, chunk of query heads, query block, KV split)  # prange
#       Qs   = scale * Q[rows]                       pack the block's query rows (R x D)
#       for each key tile [kb, kb + n) inside the visible key range of the rows
#           S    = Qs · K[kb:kb+n]ᵀ                   R x n
#           per row: softcap, hide keys outside [a, e) and where the mask hides them,
#                    m' = max(m, rowmax); P = exp(S - m'); l = l·exp(m - m') + ΣP
#           acc  = acc·exp(m - m') + P · V[kb:kb+n]   R x Dv
#       (|scale| > 1 is not applied to Qs, where it could overflow: it multiplies S before
#       the softcap, or without one every exponent, exp(|scale| (S - m)))
#       O[rows] = acc / l    (0 where l == 0: the row saw no key)
#
# A row's visible keys from causal / window / key_lengths form one interval [lo, hi), so key
# tiles outside the union of the block's intervals are never computed.  Two ways to walk a
# work item:
# - item_panels (AVX2/FMA at run time): each key tile's K and V are packed once for a
#   register-blocked micro-kernel (_gemm.h); the rows go in panels of PANEL_ROWS, and a panel
#   runs Q·Kᵀ, the softmax and P·V over only the keys its rows see, with its scores in L1.
#   On the causal diagonal and at window edges the work follows the visible pairs.
# - item_chunks (no AVX2, or at most SMALL_ROWS rows): BLAS tiles, BK keys wide where
#   every row sees every key, chunks of `edge` keys at the interval edges computed only for
#   the rows that see some of their keys.  With at most SMALL_ROWS rows (decoding) the two
#   products stream the K/V rows once (_simd.h) instead of calling BLAS.
# All sizes and strides are counted in elements; a broadcast axis is a zero stride.

# cython: language_level=3

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport INFINITY, isnan, isfinite, exp, tanh, fabs, copysign
from libc.stdint cimport int64_t, uint8_t, uint16_t
from scipy.linalg.cython_blas cimport sgemm, dgemm
cimport numpy as cnp

cnp.import_array()

ctypedef fused floating:
    float
    double

cdef extern from "_simd.h" nogil:
    float fa_max_f32(const float *x, Py_ssize_t n)
    double fa_max_f64(const double *x, Py_ssize_t n)
    float fa_expsum_f32(float *x, Py_ssize_t n, float m, float k)
    double fa_expsum_f64(double *x, Py_ssize_t n, double m, double k)
    void fa_qk_f32(const float *K, Py_ssize_t ldk, Py_ssize_t n, const float *Q, Py_ssize_t D,
                   Py_ssize_t R, float *S, Py_ssize_t lds, const char *pf, Py_ssize_t pf_ld,
                   Py_ssize_t pf_row)
    void fa_pv_f32(const float *P, Py_ssize_t lds, Py_ssize_t R, Py_ssize_t n, const float *V,
                   Py_ssize_t ldv, Py_ssize_t Dv, float *acc)
    void fa_qk_f16(const uint16_t *K, Py_ssize_t ldk, Py_ssize_t n, const float *Q,
                   Py_ssize_t D, Py_ssize_t R, float *S, Py_ssize_t lds, const char *pf,
                   Py_ssize_t pf_ld, Py_ssize_t pf_row)
    void fa_pv_f16(const float *P, Py_ssize_t lds, Py_ssize_t R, Py_ssize_t n,
                   const uint16_t *V, Py_ssize_t ldv, Py_ssize_t Dv, float *acc)
    int fa_f16_stream_ok
    void fa_qk_f64(const double *K, Py_ssize_t ldk, Py_ssize_t n, const double *Q,
                   Py_ssize_t D, Py_ssize_t R, double *S, Py_ssize_t lds, const char *pf,
                   Py_ssize_t pf_ld, Py_ssize_t pf_row)
    void fa_pv_f64(const double *P, Py_ssize_t lds, Py_ssize_t R, Py_ssize_t n,
                   const double *V, Py_ssize_t ldv, Py_ssize_t Dv, double *acc)
    const char *fa_simd_init(int use_simd)
    int fa_half_to_float(const uint16_t *src, float *dst, Py_ssize_t n)
    void fa_half_rows_to_float(const uint16_t *src, Py_ssize_t ld, Py_ssize_t n,
                               Py_ssize_t width, float *dst)
    int fa_float_to_half(const float *src, uint16_t *dst, Py_ssize_t n)

cdef extern from "_gemm.h" nogil:
    int fa_gemm_ok
    int FA_NR_F32
    int FA_NR_F64
    Py_ssize_t FA_PACKED_SIZE(Py_ssize_t n, Py_ssize_t k, Py_ssize_t nr)
    void fa_gemm_f32(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float *A, Py_ssize_t lda,
                     const float *Bp, Py_ssize_t kp, float *C, Py_ssize_t ldc, int accumulate)
    void fa_gemm_f64(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const double *A,
                     Py_ssize_t lda, const double *Bp, Py_ssize_t kp, double *C, Py_ssize_t ldc,
                     int accumulate)
    void fa_pack_t_f32(const float *X, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t k, float *Bp)
    void fa_pack_t_f64(const double *X, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t k,
                       double *Bp)
    int fa_pack_n_f32(const float *X, Py_ssize_t ldx, Py_ssize_t k, Py_ssize_t n, float *Bp)
    int fa_pack_n_f64(const double *X, Py_ssize_t ldx, Py_ssize_t k, Py_ssize_t n,
                      double *Bp)

cdef extern from "_blasctl.h" nogil:
    const char *fa_blas_init(void *gemm_symbol)
    int fa_blas_set_global(int n)
    int fa_blas_get_global()

cdef extern from "_scratch.h" nogil:
    void *fa_scratch(size_t nbytes)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FA_OPENMP 1
    #else
    #define FA_OPENMP 0
    #endif
    """
    int FA_OPENMP

cdef enum:
    # at most this many rows: stream K/V rows (decode, GQA decode, short chunks) instead of a
    # GEMM: measured (1 thread), 12 to 16 rows ran 10-20% faster streamed than packed for the
    # micro-kernel (4x8x12x2048x64 8.1 -> 6.8 ms, GQA 32/8 with 4 rows x4096x128 9.8 -> 7.7)
    SMALL_ROWS = 16
    PANEL_ROWS = 12   # rows per pass of the micro-kernel path (a multiple of its 6-row block)

cdef enum BlasTrans:
    NoTrans = 110  # 'n'
    Trans = 116    # 't'

ctypedef struct Problem:
    # sizes
    Py_ssize_t hq, hkv, group, lq, lk, d, dv
    # tiling: a work item covers `heads` query heads x `rows` query positions x one KV split
    # edge: keys per chunk where the rows see different key ranges (causal diagonal, window)
    Py_ssize_t heads, rows, n_hchunks, n_qblocks, bk, edge, n_splits, split_len
    # operands: base pointer, per-batch offsets, strides (elements); K, V rows are unit-stride
    char *q
    const int64_t *q_boff
    Py_ssize_t q_sh, q_sl, q_sd
    char *k
    const int64_t *k_boff
    Py_ssize_t k_sh, k_sl
    char *v
    const int64_t *v_boff
    Py_ssize_t v_sh, v_sl
    int kv_half                   # K and V are float16 (computing in float32): read in
                                  # place, converted in registers (F16C, few rows) or a tile
                                  # at a time into scratch, never as whole arrays
    char *o                       # OUT (*batch, Hq, Lq, Dv), any strides
    const int64_t *o_boff
    Py_ssize_t o_sh, o_sl, o_sd
    char *mask                    # uint8 (bool) or compute dtype (additive), or NULL
    int mask_is_bool
    const int64_t *m_boff
    Py_ssize_t m_sh, m_sl, m_sk
    char *w                       # OUT weights, C-contiguous (NB, Hq, Lq, Lk), or NULL
    char *part                    # partials of the KV splits: (NB, Hq, Lq, n_splits, 2 + Dv)
    const int64_t *klen           # IN (NB,) valid key count
    const int64_t *qoff           # IN (NB,) absolute position of query row 0
    int64_t left, right           # window: p - left <= j <= p + right (huge = unbounded)
    double scale, softcap         # softcap 0: none
    double post                   # scores x this after Q·Kᵀ (1, or the scale, as is ...
    double ex                     # ... this inside the exponent, P = exp(ex (S - m)): see
                                  # attention_forward
    int *failed                   # set when a thread's scratch cannot be allocated


cdef inline void gemm(char ta, char tb, int m, int n, int k, floating alpha,
                      floating *a, int lda, floating *b, int ldb, floating beta,
                      floating *c, int ldc) noexcept nogil:
    """C := alpha * op(A) op(B) + beta * C, column-major (BLAS) convention."""
    if floating is float:
        sgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc)


cdef inline void gemm_packed(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating *a,
                             Py_ssize_t lda, const floating *bp, Py_ssize_t kp, floating *c,
                             Py_ssize_t ldc, int accumulate) noexcept nogil:
    """C (m x n, row-major) := A (m x k, row-major) · B, or C += A · B; B packed in panels
    of kp rows (_gemm.h)."""
    if floating is float:
        fa_gemm_f32(m, n, k, a, lda, bp, kp, c, ldc, accumulate)
    else:
        fa_gemm_f64(m, n, k, a, lda, bp, kp, c, ldc, accumulate)


cdef inline void pack_t(const floating *x, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t k,
                        floating *bp) noexcept nogil:
    """bp := the packed panels of xᵀ, x being n rows of k (the keys of a tile)."""
    if floating is float:
        fa_pack_t_f32(x, ldx, n, k, bp)
    else:
        fa_pack_t_f64(x, ldx, n, k, bp)


cdef inline bint pack_n(const floating *x, Py_ssize_t ldx, Py_ssize_t k, Py_ssize_t n,
                        floating *bp) noexcept nogil:
    """bp := the packed panels of x, k rows of n (the values of a tile); True when every
    element is finite."""
    if floating is float:
        return fa_pack_n_f32(x, ldx, k, n, bp)
    else:
        return fa_pack_n_f64(x, ldx, k, n, bp)


cdef inline void qk_stream(const floating *K, Py_ssize_t ldk, Py_ssize_t n, const floating *Q,
                           Py_ssize_t D, Py_ssize_t R, floating *S, Py_ssize_t lds,
                           const floating *V, Py_ssize_t ldv, Py_ssize_t Dv) noexcept nogil:
    """S[r, j] = Q[r, :] · K[j, :] for few rows, K streamed once (_simd.h); V's rows [0, n)
    are fetched into the cache alongside, for the P·V pass that follows."""
    cdef Py_ssize_t size = sizeof(floating)
    if floating is float:
        fa_qk_f32(K, ldk, n, Q, D, R, S, lds, <const char *>V, ldv * size, Dv * size)
    else:
        fa_qk_f64(K, ldk, n, Q, D, R, S, lds, <const char *>V, ldv * size, Dv * size)


cdef inline void pv_stream(const floating *P, Py_ssize_t lds, Py_ssize_t R, Py_ssize_t n,
                           const floating *V, Py_ssize_t ldv, Py_ssize_t Dv,
                           floating *acc) noexcept nogil:
    """acc[r, :] += Σ_j P[r, j] V[j, :] for few rows, V streamed once, P == 0 terms skipped."""
    if floating is float:
        fa_pv_f32(P, lds, R, n, V, ldv, Dv, acc)
    else:
        fa_pv_f64(P, lds, R, n, V, ldv, Dv, acc)


cdef inline floating row_max(const floating *x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return fa_max_f32(x, n)
    else:
        return fa_max_f64(x, n)


cdef inline floating row_expsum(floating *x, Py_ssize_t n, floating m,
                                floating k) noexcept nogil:
    """x := exp((x - m) k) in place; returns the sum."""
    if floating is float:
        return fa_expsum_f32(x, n, m, k)
    else:
        return fa_expsum_f64(x, n, m, k)


cdef inline Py_ssize_t clamp(int64_t x, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if x < lo:
        return lo
    if x > hi:
        return hi
    return <Py_ssize_t>x


cdef inline bint tile_finite(const floating *v, Py_ssize_t n, Py_ssize_t dv,
                             Py_ssize_t ld) noexcept nogil:
    cdef Py_ssize_t j, c
    for j in range(n):
        for c in range(dv):
            if not isfinite(v[j * ld + c]):
                return False
    return True


cdef void pv_visible(const floating *S, Py_ssize_t lds, Py_ssize_t ra, Py_ssize_t rb,
                     Py_ssize_t n, const floating *v, Py_ssize_t ldv, Py_ssize_t Dv,
                     floating *acc) noexcept nogil:
    """acc[r] += Σ_j S[r, j] V[j] over the terms with S[r, j] != 0 only, for rows [ra, rb):
    a hidden key's non-finite V row must not turn 0 · inf into NaN."""
    cdef Py_ssize_t r, j, c
    for r in range(ra, rb):
        for j in range(n):
            if S[r * lds + j] != 0:
                for c in range(Dv):
                    acc[r * Dv + c] += S[r * lds + j] * v[j * ldv + c]


cdef bint scores_to_probs(const Problem *P, Py_ssize_t b, Py_ssize_t h0, Py_ssize_t i0,
                          Py_ssize_t ni, Py_ssize_t nh, int64_t off, int64_t kl, Py_ssize_t kb,
                          Py_ssize_t n, Py_ssize_t ra, Py_ssize_t rb, floating *S,
                          Py_ssize_t lds, floating *acc, floating *mrow,
                          floating *lrow) noexcept nogil:
    """Rows [ra, rb) of a score tile (keys kb..kb+n; row r at S + (r - ra) lds) become
    probabilities.

    Per row: the scale (when it is applied here, not to Q), softcap, keys outside the row's
    visible interval [a, e) and where the mask hides them go to -inf, the weights output
    gets the scores, then the online-softmax update:
    m' = max(m, rowmax), P = exp(S - m') in place (0 at hidden keys), l = l·exp(m - m') + ΣP,
    acc rescaled by exp(m - m').  Returns True when some key of the tile is hidden from some
    row: the P·V product must then guard against non-finite V rows at those keys.
    """
    cdef Py_ssize_t Dv = P.dv, r, c, j, h, i, a, e
    cdef int64_t pos
    cdef floating *row
    cdef floating *wbase
    cdef uint8_t *mb
    cdef floating *mf
    cdef floating mx, m_new, alpha, total, cap = <floating>P.softcap, post = <floating>P.post
    cdef floating ex = <floating>P.ex
    cdef floating ninf = -INFINITY
    cdef bint partial = P.mask != NULL
    for r in range(ra, rb):
        if nh == 1:             # the common case, without two divisions a row
            h = h0
            i = i0 + r
        else:
            h = h0 + r // ni
            i = i0 + r % ni
        pos = off + i
        row = S + (r - ra) * lds
        a = clamp(pos - P.left - kb, 0, n)
        e = clamp(pos + P.right + 1 - kb, a, n)
        e = clamp(kl - kb, a, e)
        if a > 0 or e < n:
            partial = True
        if post != 1:
            for j in range(a, e):
                row[j] = row[j] * post
        if cap > 0:
            for j in range(a, e):
                row[j] = cap * tanh(row[j] / cap)
        if P.mask != NULL:
            if P.mask_is_bool:
                mb = <uint8_t *>P.mask + P.m_boff[b] + h * P.m_sh + i * P.m_sl + kb * P.m_sk
                for j in range(a, e):
                    if mb[j * P.m_sk] == 0:
                        row[j] = ninf
            else:
                mf = <floating *>P.mask + P.m_boff[b] + h * P.m_sh + i * P.m_sl + kb * P.m_sk
                for j in range(a, e):
                    if mf[j * P.m_sk] == ninf:
                        row[j] = ninf
                    elif ex == 1:
                        row[j] = row[j] + mf[j * P.m_sk]
                    else:       # the mask in the scores' units: ex (S + M / ex) = ex S + M
                        row[j] = row[j] + mf[j * P.m_sk] / ex
        if P.w != NULL:
            wbase = <floating *>P.w + ((b * P.hq + h) * P.lq + i) * P.lk + kb
            for j in range(n):
                wbase[j] = row[j] if a <= j < e else ninf
        mx = row_max(row + a, e - a)
        if mx == ninf:
            # nothing visible here, unless a NaN score hides from the max
            for j in range(a, e):
                if isnan(row[j]):
                    mx = row[j]
            if mx == ninf:
                memset(row, 0, n * sizeof(floating))
                continue
        m_new = mx if (mx > mrow[r] or isnan(mx)) else mrow[r]
        if a > 0:
            memset(row, 0, a * sizeof(floating))
        if e < n:
            memset(row + e, 0, (n - e) * sizeof(floating))
        total = row_expsum(row + a, e - a, m_new, ex)
        if mrow[r] == ninf:     # the row's first visible keys: acc and l are still 0
            lrow[r] = total
        else:
            alpha = exp((mrow[r] - m_new) * ex)
            lrow[r] = lrow[r] * alpha + total
            if alpha != 1:
                for c in range(Dv):
                    acc[r * Dv + c] *= alpha
        mrow[r] = m_new
    return partial


cdef inline floating *kv_tile(const Problem *P, char *base, Py_ssize_t j, Py_ssize_t n,
                              Py_ssize_t ld, Py_ssize_t width, floating *buf,
                              Py_ssize_t *ld_out) noexcept nogil:
    """Rows [j, j + n) of one K or V head (base: its row 0) in the compute dtype: in place,
    or for float16 K/V converted into buf (n x width, contiguous); ld_out: their stride."""
    if floating is float:
        if P.kv_half:
            fa_half_rows_to_float(<const uint16_t *>base + j * ld, ld, n, width, buf)
            ld_out[0] = width
            return buf
    ld_out[0] = ld
    return <floating *>base + j * ld


cdef void item_chunks(const Problem *P, Py_ssize_t b, Py_ssize_t h0, Py_ssize_t i0,
                      Py_ssize_t ni, Py_ssize_t nh, int64_t off, int64_t kl, Py_ssize_t lo,
                      Py_ssize_t hi, char *kbase, char *vbase, floating *Qs,
                      floating *S, floating *acc, floating *mrow, floating *lrow,
                      floating *Kc, floating *Vc) noexcept nogil:
    """Keys [lo, hi) of a work item in chunks, the products by BLAS (or, with at most
    SMALL_ROWS rows, by the streaming kernels of _simd.h).  Kc, Vc: room for a chunk of
    float16 K and V converted."""
    cdef Py_ssize_t D = P.d, Dv = P.dv, BK = P.bk, R = nh * ni, lds = P.bk
    cdef Py_ssize_t kb, n, ldk = 0, ldv = 0
    cdef bint partial
    # float16 K/V and few rows: streamed as they are, converted in registers (F16C)
    cdef bint half_stream = P.kv_half and fa_f16_stream_ok and R <= SMALL_ROWS
    # Inside [full_lo, full_hi) every row sees every key: big tiles, no edge masks.  Outside
    # it (the causal diagonal, the window edges) small key chunks, each computed only for
    # the rows that see any of its keys: a contiguous range when the rows are consecutive
    # positions of one head (nh == 1).
    cdef int64_t pos0 = off + i0
    cdef Py_ssize_t full_lo = clamp(pos0 + ni - 1 - P.left, lo, hi)
    cdef Py_ssize_t full_hi = clamp(pos0 + P.right + 1, full_lo, hi)
    if full_hi - full_lo < P.edge:      # too thin for a big tile: all edge chunks
        full_hi = full_lo
    cdef Py_ssize_t ra = 0, rb = R, rn
    cdef floating *kblk = NULL
    cdef floating *vblk = NULL
    kb = lo
    while kb < hi:
        if kb < full_lo:
            n = min(P.edge, full_lo - kb)
        elif kb < full_hi:
            n = min(BK, full_hi - kb)
        else:
            n = min(P.edge, hi - kb)
        if nh == 1:
            ra = clamp(kb - pos0 - P.right, 0, R)
            rb = clamp(kb + n - pos0 + P.left, ra, R)
        rn = rb - ra
        if rn == 0:
            kb += n
            continue
        if not half_stream:
            kblk = kv_tile(P, kbase, kb, n, P.k_sl, D, Kc, &ldk)
            vblk = kv_tile(P, vbase, kb, n, P.v_sl, Dv, Vc, &ldv)
        # S (rn x n, row-major, ld BK) = Qs · K_blkᵀ, i.e. column-major Sᵀ = K_blk · Qsᵀ.
        # Streamed with several rows, the Q·Kᵀ pass also fetches V's rows into the cache, so
        # the P·V pass computes from cache instead of waiting on memory.  (One row: its P·V
        # pass streams V near the bandwidth by itself; fetching V early, in 256-key chunks,
        # measured mixed at 1 thread: 1x32x4096x128 16.4 -> 14.8 GB/s, 8x12x1024x64 15.1 ->
        # 17.6, so it stays off.)
        if D == 0:
            memset(S + ra * lds, 0, rn * lds * sizeof(floating))
        elif half_stream:
            if floating is float:
                fa_qk_f16(<const uint16_t *>kbase + kb * P.k_sl, P.k_sl, n, Qs + ra * D, D, rn,
                          S + ra * lds, lds, vbase + kb * P.v_sl * 2 if rn > 1 else NULL,
                          P.v_sl * 2, Dv * 2)
        elif rn <= SMALL_ROWS:
            qk_stream(kblk, ldk, n, Qs + ra * D, D, rn, S + ra * lds, lds,
                      vblk if rn > 1 else NULL, ldv, Dv)
        else:
            gemm(Trans, NoTrans, <int>n, <int>rn, <int>D, <floating>1, kblk,
                 <int>ldk, Qs + ra * D, <int>D, <floating>0, S + ra * lds, <int>lds)
        partial = scores_to_probs(P, b, h0, i0, ni, nh, off, kl, kb, n, ra, rb, S + ra * lds,
                                  lds, acc, mrow, lrow)
        # acc (R x Dv, row-major) += P · V_blk, i.e. column-major accᵀ += V_blkᵀ · Pᵀ.
        # A hidden key has P = 0, but 0 * inf = NaN: where such a key's V row is not finite,
        # add only the visible terms.
        if Dv == 0:
            pass
        elif half_stream:
            if floating is float:
                fa_pv_f16(S + ra * lds, lds, rn, n, <const uint16_t *>vbase + kb * P.v_sl,
                          P.v_sl, Dv, acc + ra * Dv)
        elif rn <= SMALL_ROWS:
            pv_stream(S + ra * lds, lds, rn, n, vblk, ldv, Dv, acc + ra * Dv)
        elif not partial or tile_finite(vblk, n, Dv, ldv):
            gemm(NoTrans, NoTrans, <int>Dv, <int>rn, <int>n, <floating>1, vblk,
                 <int>ldv, S + ra * lds, <int>lds, <floating>1, acc + ra * Dv, <int>Dv)
        else:
            pv_visible(S, lds, ra, rb, n, vblk, ldv, Dv, acc)
        kb += n


cdef void item_panels(const Problem *P, Py_ssize_t b, Py_ssize_t h0, Py_ssize_t i0,
                      Py_ssize_t ni, Py_ssize_t nh, int64_t off, int64_t kl, Py_ssize_t lo,
                      Py_ssize_t hi, char *kbase, char *vbase, floating *Qs,
                      floating *S, floating *acc, floating *mrow, floating *lrow,
                      floating *Kp, floating *Vp, floating *Cb) noexcept nogil:
    """Keys [lo, hi) of a work item in tiles of BK, each tile's K and V packed once for the
    micro-kernel (_gemm.h); the rows in panels of PANEL_ROWS.  A panel computes only the
    keys some row of it sees (from the first packed column panel holding one), so on the
    causal diagonal and at window edges the work follows the visible pairs; its scores stay
    in L1 from Q·Kᵀ through the softmax to P·V.  Cb: room for a tile of float16 K or V
    converted (K's is packed before V's is converted)."""
    cdef Py_ssize_t D = P.d, Dv = P.dv, R = nh * ni, lds = P.bk
    cdef Py_ssize_t NR = FA_NR_F32 if floating is float else FA_NR_F64
    cdef Py_ssize_t kb, n, r0, r1, r, pa, pe, ldk, ldv
    cdef int64_t pmin, pmax, pos
    cdef floating *kblk
    cdef floating *vblk
    cdef bint vfinite, partial
    kb = lo
    while kb < hi:
        n = min(P.bk, hi - kb)
        if D > 0:
            kblk = kv_tile(P, kbase, kb, n, P.k_sl, D, Cb, &ldk)
            pack_t(kblk, ldk, n, D, Kp)
        vblk = kv_tile(P, vbase, kb, n, P.v_sl, Dv, Cb, &ldv)
        vfinite = Dv > 0 and pack_n(vblk, ldv, n, Dv, Vp)
        r0 = 0
        while r0 < R:
            r1 = min(r0 + PANEL_ROWS, R)
            # the keys of this tile that some row of the panel sees: [pa, pe)
            if nh == 1:
                pmin = off + i0 + r0
                pmax = off + i0 + r1 - 1
            else:
                pmin = pmax = off + i0 + r0 % ni
                for r in range(r0 + 1, r1):
                    pos = off + i0 + r % ni
                    pmin = min(pmin, pos)
                    pmax = max(pmax, pos)
            pa = clamp(pmin - P.left - kb, 0, n)
            pe = clamp(pmax + P.right + 1 - kb, pa, n)
            pe = clamp(kl - kb, pa, pe)
            if pe > pa:
                pa -= pa % NR
                if D == 0:
                    memset(S, 0, (r1 - r0) * lds * sizeof(floating))
                else:
                    gemm_packed(r1 - r0, pe - pa, D, Qs + r0 * D, D, Kp + pa * D, D, S + pa,
                                lds, 0)
                partial = scores_to_probs(P, b, h0, i0, ni, nh, off, kl, kb + pa, pe - pa, r0,
                                          r1, S + pa, lds, acc, mrow, lrow)
                if Dv == 0:
                    pass
                elif not partial or vfinite:
                    gemm_packed(r1 - r0, Dv, pe - pa, S + pa, lds, Vp + pa * NR, n,
                                acc + r0 * Dv, Dv, 1)
                else:
                    pv_visible(S + pa, lds, 0, r1 - r0, pe - pa, vblk + pa * ldv, ldv, Dv,
                               acc + r0 * Dv)
            r0 = r1
        kb += n


cdef void process_item(const Problem *P, Py_ssize_t w, floating *scratch) noexcept nogil:
    """One work item: a block of query rows of one batch item against a range of keys."""
    cdef Py_ssize_t D = P.d, Dv = P.dv, BK = P.bk, G = P.group
    cdef Py_ssize_t split = w % P.n_splits
    w //= P.n_splits
    # the heaviest query blocks (largest causal prefix) first, for dynamic scheduling
    cdef Py_ssize_t qb = P.n_qblocks - 1 - w % P.n_qblocks
    w //= P.n_qblocks
    cdef Py_ssize_t hc = w % P.n_hchunks
    w //= P.n_hchunks
    cdef Py_ssize_t hk = w % P.hkv
    cdef Py_ssize_t b = w // P.hkv

    cdef Py_ssize_t h0 = hk * G + hc * P.heads
    cdef Py_ssize_t nh = min(P.heads, G - hc * P.heads)
    cdef Py_ssize_t i0 = qb * P.rows
    cdef Py_ssize_t ni = min(P.rows, P.lq - i0)
    cdef Py_ssize_t R = nh * ni
    cdef int64_t kl = P.klen[b], off = P.qoff[b]

    # scratch: Qs (R x D) | S (R x BK) | acc (R x Dv) | m (R) | l (R) | K, V tiles packed |
    # with float16 K/V, a tile converted (the packed tiles' room is the chunks' converted K/V)
    cdef floating *Qs = scratch
    cdef floating *S = Qs + P.heads * P.rows * D
    cdef floating *acc = S + P.heads * P.rows * BK
    cdef floating *mrow = acc + P.heads * P.rows * Dv
    cdef floating *lrow = mrow + P.heads * P.rows
    cdef floating *Kp = lrow + P.heads * P.rows
    cdef floating *Vp = Kp + FA_PACKED_SIZE(BK, D, FA_NR_F32)
    cdef floating *Cb = Vp + FA_PACKED_SIZE(Dv, BK, FA_NR_F32)

    # union of the rows' visible key intervals, intersected with this split's range
    cdef Py_ssize_t lo = clamp(off + i0 - P.left, 0, kl)
    cdef Py_ssize_t hi = clamp(off + i0 + ni - 1 + P.right + 1, lo, kl)
    if P.n_splits > 1:
        lo = max(lo, split * P.split_len)
        hi = min(hi, (split + 1) * P.split_len)

    cdef floating *q = <floating *>P.q + P.q_boff[b]
    cdef Py_ssize_t kvsize = 2 if P.kv_half else sizeof(floating)
    cdef char *kbase = P.k + (P.k_boff[b] + hk * P.k_sh) * kvsize
    cdef char *vbase = P.v + (P.v_boff[b] + hk * P.v_sh) * kvsize
    cdef floating *wbase = NULL
    cdef floating *src
    cdef floating inv = 0, ex = <floating>P.ex
    cdef floating scale = <floating>P.scale
    cdef floating ninf = -INFINITY
    cdef Py_ssize_t r, c, j, h, i

    for r in range(R):
        h = h0 + r // ni
        i = i0 + r % ni
        src = q + h * P.q_sh + i * P.q_sl
        for c in range(D):
            Qs[r * D + c] = scale * src[c * P.q_sd]
        mrow[r] = ninf
        lrow[r] = 0
        if P.w != NULL:
            # hidden keys in [lo, hi) that no chunk visits must still come out as 0
            wbase = <floating *>P.w + ((b * P.hq + h) * P.lq + i) * P.lk
            for j in range(lo, hi):
                wbase[j] = ninf
    memset(acc, 0, R * Dv * sizeof(floating))

    if fa_gemm_ok and R > SMALL_ROWS:
        item_panels(P, b, h0, i0, ni, nh, off, kl, lo, hi, kbase, vbase, Qs, S, acc, mrow, lrow,
                    Kp, Vp, Cb)
    else:
        item_chunks(P, b, h0, i0, ni, nh, off, kl, lo, hi, kbase, vbase, Qs, S, acc, mrow,
                    lrow, Kp, Vp)

    cdef floating *o
    for r in range(R):
        h = h0 + r // ni
        i = i0 + r % ni
        if P.n_splits > 1:
            o = <floating *>P.part + (((b * P.hq + h) * P.lq + i) * P.n_splits + split) * (2 + Dv)
            o[0] = mrow[r]
            o[1] = lrow[r]
            for c in range(Dv):
                o[2 + c] = acc[r * Dv + c]
            continue
        o = <floating *>P.o + P.o_boff[b] + h * P.o_sh + i * P.o_sl
        if lrow[r] == 0:
            for c in range(Dv):
                o[c * P.o_sd] = 0
        else:
            inv = 1 / lrow[r]
            for c in range(Dv):
                o[c * P.o_sd] = acc[r * Dv + c] * inv
        if P.w != NULL:
            wbase = <floating *>P.w + ((b * P.hq + h) * P.lq + i) * P.lk
            for j in range(lo, hi):
                wbase[j] = exp((wbase[j] - mrow[r]) * ex) * inv if lrow[r] != 0 else 0


cdef void merge_row(const Problem *P, Py_ssize_t t, floating dummy) noexcept nogil:
    """Combine the KV-split partials (m, l, acc) of one output row t = (b, h, i)."""
    cdef Py_ssize_t s, c, Dv = P.dv, ns = P.n_splits
    cdef Py_ssize_t i = t % P.lq
    cdef Py_ssize_t h = (t // P.lq) % P.hq
    cdef Py_ssize_t b = t // (P.lq * P.hq)
    cdef floating *part = <floating *>P.part + t * ns * (2 + Dv)
    cdef floating *o = <floating *>P.o + P.o_boff[b] + h * P.o_sh + i * P.o_sl
    cdef floating M = -INFINITY, L = 0, f, ex = <floating>P.ex
    for s in range(ns):
        if part[s * (2 + Dv)] > M or isnan(part[s * (2 + Dv)]):
            M = part[s * (2 + Dv)]
    for c in range(Dv):
        o[c * P.o_sd] = 0
    if M == -INFINITY:
        return
    for s in range(ns):
        if part[s * (2 + Dv)] == -INFINITY:
            continue
        f = exp((part[s * (2 + Dv)] - M) * ex)
        L += f * part[s * (2 + Dv) + 1]
        for c in range(Dv):
            o[c * P.o_sd] += f * part[s * (2 + Dv) + 2 + c]
    f = 1 / L
    for c in range(Dv):
        o[c * P.o_sd] *= f


cdef void run(Problem *P, Py_ssize_t nwork, Py_ssize_t nrows, int nthreads,
              floating dummy) noexcept nogil:
    cdef Py_ssize_t w, t
    cdef Py_ssize_t tile = P.heads * P.rows
    cdef size_t nscratch = (tile * (P.d + P.bk + P.dv + 2) + FA_PACKED_SIZE(P.bk, P.d, FA_NR_F32)
                            + FA_PACKED_SIZE(P.dv, P.bk, FA_NR_F32)
                            + (P.bk * max(P.d, P.dv) if P.kv_half else 0))
    cdef floating *scratch
    if nthreads <= 1 or nwork <= 1:
        scratch = <floating *>fa_scratch(nscratch * sizeof(floating))
        if scratch == NULL:
            P.failed[0] = 1
            return
        for w in range(nwork):
            process_item(P, w, scratch)
    else:
        with parallel(num_threads=nthreads):
            scratch = <floating *>fa_scratch(nscratch * sizeof(floating))
            for w in prange(nwork, schedule='dynamic'):
                if scratch == NULL:
                    P.failed[0] = 1
                else:
                    process_item(P, w, scratch)
    if P.n_splits > 1 and not P.failed[0]:
        if nthreads <= 1:
            for t in range(nrows):
                merge_row(P, t, dummy)
        else:
            for t in prange(nrows, num_threads=nthreads, schedule='static'):
                merge_row(P, t, dummy)


cdef inline char *data(cnp.ndarray a):
    return <char *>cnp.PyArray_DATA(a) if a is not None else NULL


cdef void elem_strides(cnp.ndarray a, Py_ssize_t *st3):
    """Strides of the last three axes in elements (0 for length-1 axes: they broadcast)."""
    cdef int t, ax
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(a)
    for t in range(3):
        ax = cnp.PyArray_NDIM(a) - 3 + t
        st3[t] = cnp.PyArray_STRIDES(a)[ax] // isz if cnp.PyArray_DIMS(a)[ax] != 1 else 0


cdef void batch_offsets(cnp.ndarray a, tuple batch_shape, Py_ssize_t nb, int64_t *out):
    """out[b] = element offset of batch item b of a (*batch_a, X, Y, Z), batch_a broadcasting
    to batch_shape (missing and length-1 axes have stride 0)."""
    cdef Py_ssize_t nbd = len(batch_shape), own = cnp.PyArray_NDIM(a) - 3
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(a)
    cdef Py_ssize_t t, ax, bi
    cdef int64_t cur = 0
    cdef int64_t st[32]
    cdef int64_t n[32]
    cdef int64_t idx[32]
    for t in range(nbd):
        ax = t - (nbd - own)
        n[t] = batch_shape[t]
        idx[t] = 0
        st[t] = 0
        if ax >= 0 and cnp.PyArray_DIMS(a)[ax] != 1:
            st[t] = cnp.PyArray_STRIDES(a)[ax] // isz
    for bi in range(nb):
        out[bi] = cur
        t = nbd - 1
        while t >= 0:          # odometer step over the batch index
            idx[t] += 1
            cur += st[t]
            if idx[t] < n[t]:
                break
            cur -= st[t] * n[t]
            idx[t] = 0
            t -= 1


def attention_forward(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray o,
                      cnp.ndarray mask, cnp.ndarray weights, cnp.ndarray klen, cnp.ndarray qoff,
                      tuple batch_shape, tuple tiling, int64_t left, int64_t right,
                      double scale, double softcap, int nthreads):
    """Run the kernel on operands checked by fastattn._attention (see Problem above).

    q (*bq, Hq, Lq, D), k (*bk, Hkv, Lk, D), v (*bv, Hkv, Lk, Dv): the compute dtype (k and v
    may both be float16 when it is float32: converted a tile at a time), batch
    axes broadcasting to batch_shape, K/V rows BLAS-readable (unit feature stride, leading
    dimension in [max(1, D), 2**31 - 1] when Lk > 1).  o (*batch, Hq, Lq, Dv) and mask
    (uint8 for bool, else the compute dtype; at least 3-D, broadcasting to
    (*batch, Hq, Lq, Lk)) in any aligned strides; weights C-contiguous or None.  klen and
    qoff: int64 (NB,) arrays, or None for Lk and Lk - Lq.
    tiling = (heads, rows, bk, edge, n_splits, split_len).
    """
    cdef Problem P
    cdef int failed = 0
    cdef Py_ssize_t nb = 1, t
    cdef Py_ssize_t st[3]
    for t in range(len(batch_shape)):
        nb *= <Py_ssize_t>batch_shape[t]
    if len(batch_shape) > 32:
        raise ValueError(f"at most 32 batch axes are supported, got {len(batch_shape)}")
    P.hq, P.lq, P.d = q.shape[q.ndim - 3], q.shape[q.ndim - 2], q.shape[q.ndim - 1]
    P.hkv, P.lk, P.dv = v.shape[v.ndim - 3], v.shape[v.ndim - 2], v.shape[v.ndim - 1]
    P.heads, P.rows, P.bk, P.edge, P.n_splits, P.split_len = tiling
    P.group = P.hq // P.hkv
    P.n_hchunks = (P.group + P.heads - 1) // P.heads
    P.n_qblocks = (P.lq + P.rows - 1) // P.rows
    elem_strides(q, st)
    P.q_sh, P.q_sl, P.q_sd = st[0], st[1], st[2]
    elem_strides(k, st)
    P.k_sh, P.k_sl = st[0], (st[1] if P.lk > 1 else max(1, P.d))
    elem_strides(v, st)
    P.v_sh, P.v_sl = st[0], (st[1] if P.lk > 1 else max(1, P.dv))
    elem_strides(o, st)
    P.o_sh, P.o_sl, P.o_sd = st[0], st[1], st[2]
    P.m_sh = P.m_sl = P.m_sk = 0
    if mask is not None:
        elem_strides(mask, st)
        P.m_sh, P.m_sl, P.m_sk = st[0], st[1], st[2]
    P.q, P.k, P.v, P.o = data(q), data(k), data(v), data(o)
    P.kv_half = cnp.PyArray_ITEMSIZE(k) == 2
    if (cnp.PyArray_ITEMSIZE(v) != cnp.PyArray_ITEMSIZE(k)
            or cnp.PyArray_ITEMSIZE(q) != (4 if P.kv_half else cnp.PyArray_ITEMSIZE(k))):
        raise TypeError(f"attention_forward: q, k, v must share the compute dtype (k and v may "
                        f"both be float16 with float32 q), got {q.dtype}, {k.dtype}, {v.dtype}")
    P.mask = data(mask)
    P.mask_is_bool = mask is not None and cnp.PyArray_ITEMSIZE(mask) == 1
    P.w = data(weights)
    P.left, P.right = left, right
    # Up to 1 the scale shrinks Q, which keeps large q·k finite.  A larger one would overflow
    # Q's products where the scores do not (scale 1e36, q·k = 30·30 - 30·30 = 0), or the
    # scores themselves where the softmax does not (2e38 · 2 in float32): without a softcap
    # it goes inside the exponent, P = exp(|scale| (S - m)) with S and m in q·k units (Q
    # negated for a negative scale, exactly); with one it multiplies the scores before the
    # tanh, which bounds them.
    P.scale, P.post, P.ex = scale, 1.0, 1.0
    if fabs(scale) > 1:
        if softcap > 0:
            P.scale, P.post = 1.0, scale
        else:
            P.scale, P.ex = copysign(1.0, scale), fabs(scale)
    P.softcap = softcap
    P.failed = &failed

    # one block for the per-batch tables: offsets of q, k, v, o, mask, then klen, qoff
    cdef int64_t *tables = <int64_t *>malloc(7 * max(nb, 1) * sizeof(int64_t))
    cdef size_t part_bytes = 0
    if P.n_splits > 1:
        part_bytes = nb * P.hq * P.lq * P.n_splits * (2 + P.dv) * cnp.PyArray_ITEMSIZE(q)
    P.part = <char *>malloc(part_bytes) if part_bytes else NULL
    if tables == NULL or (part_bytes and P.part == NULL):
        free(tables)
        free(P.part)
        raise MemoryError("fastattn: could not allocate the kernel's tables")
    cdef Py_ssize_t nwork = nb * P.hkv * P.n_hchunks * P.n_qblocks * P.n_splits
    cdef Py_ssize_t nrows = nb * P.hq * P.lq
    cdef float f32 = 0
    cdef double f64 = 0
    try:
        batch_offsets(q, batch_shape, nb, tables)
        batch_offsets(k, batch_shape, nb, tables + nb)
        batch_offsets(v, batch_shape, nb, tables + 2 * nb)
        batch_offsets(o, batch_shape, nb, tables + 3 * nb)
        if mask is not None:
            batch_offsets(mask, batch_shape, nb, tables + 4 * nb)
        P.q_boff, P.k_boff, P.v_boff = tables, tables + nb, tables + 2 * nb
        P.o_boff, P.m_boff = tables + 3 * nb, tables + 4 * nb
        if klen is not None:
            P.klen = <const int64_t *>cnp.PyArray_DATA(klen)
        else:
            for t in range(nb):
                tables[5 * nb + t] = P.lk
            P.klen = tables + 5 * nb
        if qoff is not None:
            P.qoff = <const int64_t *>cnp.PyArray_DATA(qoff)
        else:
            for t in range(nb):
                tables[6 * nb + t] = P.klen[t] - P.lq
            P.qoff = tables + 6 * nb
        if cnp.PyArray_ITEMSIZE(q) == 4:
            with nogil:
                run(&P, nwork, nrows, nthreads, f32)
        else:
            with nogil:
                run(&P, nwork, nrows, nthreads, f64)
    finally:
        free(tables)
        free(P.part)
    if failed:
        raise MemoryError("fastattn: could not allocate the kernel's per-thread scratch")


SMALL_ROWS_LIMIT = SMALL_ROWS   # for the Python policy: up to this many rows, no BLAS call


# ---- small twins of the nogil helpers, for tests and show_config -------------------------

def simd_init(bint use_simd=True):
    """Select the SIMD paths (row passes, decode streaming, the micro-kernel) or the plain-C /
    BLAS ones; returns the name ('avx2+fma' or 'scalar')."""
    return fa_simd_init(use_simd).decode()


def micro_kernel_enabled():
    """True when the tiles' products run on the micro-kernel, so the kernel calls no BLAS."""
    return bool(fa_gemm_ok)


def convert_half(cnp.ndarray src, cnp.ndarray dst):
    """Convert C-contiguous float16 <-> float32 arrays of equal size with F16C, without the
    GIL.  Returns False (nothing done) where the CPU has no F16C."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src)
    cdef int done
    if not (cnp.PyArray_IS_C_CONTIGUOUS(src) and cnp.PyArray_IS_C_CONTIGUOUS(dst)
            and cnp.PyArray_SIZE(dst) == n):
        raise ValueError("convert_half needs C-contiguous arrays of equal size")
    cdef void *s = cnp.PyArray_DATA(src)
    cdef void *d = cnp.PyArray_DATA(dst)
    if src.dtype.itemsize == 2 and dst.dtype.itemsize == 4:
        with nogil:
            done = fa_half_to_float(<const uint16_t *>s, <float *>d, n)
    elif src.dtype.itemsize == 4 and dst.dtype.itemsize == 2:
        with nogil:
            done = fa_float_to_half(<const float *>s, <uint16_t *>d, n)
    else:
        raise ValueError("convert_half converts float16 <-> float32")
    return bool(done)


def py_row_expsum(floating[::1] x, floating m, floating k=1):
    """x := exp((x - m) k) in place with the selected implementation; returns the sum."""
    if x.shape[0] == 0:
        return 0.0
    return row_expsum(&x[0], x.shape[0], m, k)


def py_row_max(floating[::1] x):
    """The selected implementation's max of x (-inf when x is empty)."""
    if x.shape[0] == 0:
        return -INFINITY
    return row_max(&x[0], x.shape[0])


def read_probe(const float[::1] a, Py_ssize_t block=512):
    """The largest element of a (-inf if a is empty), read as two sequential streams, its
    two halves `block` floats at a time in turn, by the kernels' vectorised max with the GIL
    released: the benchmark's memory-read probe (a stream a core reads this way reaches more
    of the bandwidth than NumPy's max-reduction does)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    cdef Py_ssize_t n = a.shape[0], half = n // 2, i = 0, m
    cdef float r = -INFINITY
    if n == 0:
        return r
    with nogil:
        while i < half:
            m = min(block, half - i)
            r = max(r, fa_max_f32(&a[i], m), fa_max_f32(&a[half + i], m))
            i += m
        if n % 2:
            r = max(r, a[n - 1])
    return r


def py_gemm_packed(floating[:, ::1] a, floating[:, ::1] x, bint x_is_keys, floating[:, ::1] c,
                   bint accumulate):
    """The micro-kernel's product (AVX2 only): c := a · B or c += a · B, with B = xᵀ packed
    by pack_t when x_is_keys (x: n rows of k, like K), else B = x packed by pack_n (x: k rows
    of n, like V).  Returns whether pack_n saw only finite values (True for pack_t)."""
    if not fa_gemm_ok:
        raise RuntimeError("the micro-kernel needs AVX2/FMA")
    cdef Py_ssize_t m = a.shape[0], k = a.shape[1]
    cdef Py_ssize_t n = x.shape[0] if x_is_keys else x.shape[1]
    if (x.shape[1] if x_is_keys else x.shape[0]) != k or c.shape[0] != m or c.shape[1] != n:
        raise ValueError("shapes do not match")
    cdef floating *bp = <floating *>malloc(max(1, FA_PACKED_SIZE(n, k, FA_NR_F32)) *
                                           sizeof(floating))
    if bp == NULL:
        raise MemoryError()
    cdef bint finite = True
    cdef const floating *xp = &x[0, 0] if x.shape[0] and x.shape[1] else NULL
    if n and k:
        if x_is_keys:
            pack_t(xp, x.shape[1], n, k, bp)
        else:
            finite = pack_n(xp, x.shape[1], k, n, bp)
    if m and n:
        gemm_packed(m, n, k, &a[0, 0] if k else bp, max(k, 1), bp, k, &c[0, 0], n, accumulate)
    free(bp)
    return finite


def blas_init():
    """Find the thread controls of the BLAS behind scipy.linalg.cython_blas; returns its path."""
    p = fa_blas_init(<void *>sgemm)
    return p.decode() if p != NULL else None


def blas_set_global(int n):
    """Set the BLAS library's global thread count; returns the previous one (-1: unknown)."""
    return fa_blas_set_global(n)


def blas_get_global():
    return fa_blas_get_global()


def openmp_enabled():
    return bool(FA_OPENMP)
