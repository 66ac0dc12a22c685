// AVX-512 IFMA kernels (52-bit multiply-accumulate): NTT butterflies and dyadic products for primes below 2^50.
//
// Approach after Boemer et al., "Intel HEXL" (WAHC 2021), own implementation: residues stay below 4q < 2^52, so
// every product fits the 52-bit multipliers. A Shoup product x*w mod q is one vpmadd52hi (quotient estimate from
// w' = floor(w 2^52 / q)) and two vpmadd52lo, lazy in [0, 2q); a product of two variables is a 104-bit product
// (lo/hi halves) and a Barrett estimate from its top bits. Stages whose butterflies are closer than 8 lanes run the
// portable code on the same lazy ranges. Results equal the portable path word for word (tests run both).
#include <immintrin.h>

#include "runtime.h"

namespace medhe {

bool ifma_cpu() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512ifma") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

#define MEDHE_IFMA __attribute__((target("avx512f,avx512ifma,avx512vl,avx512dq,avx512bw")))

namespace {

inline u64 shoup52(u64 w, u64 q) { return static_cast<u64>((static_cast<u128>(w) << 52) / q); }

// The 52-bit Shoup quotients live in the tables (NTTTables::*_wq52), built with them: no lookups per call.
struct Quot52 {
    const u64* fwd;
    const u64* inv;
    u64 inv_n_w, inv_n_q52;
};

inline Quot52 quot52(const NTTTables& t) {
    return Quot52{t.root_wq52.data(), t.inv_wq52.data(), t.inv_n.w, t.inv_n_wq52};
}

MEDHE_IFMA inline __m512i mul_shoup52(__m512i x, __m512i w, __m512i wq, __m512i q) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i quot = _mm512_madd52hi_epu64(zero, x, wq);
    __m512i prod = _mm512_madd52lo_epu64(zero, x, w);
    __m512i sub = _mm512_madd52lo_epu64(zero, quot, q);
    return _mm512_and_si512(_mm512_sub_epi64(prod, sub), _mm512_set1_epi64((1LL << 52) - 1));
}

MEDHE_IFMA inline __m512i sub_if_ge(__m512i x, __m512i bound) {
    return _mm512_min_epu64(x, _mm512_sub_epi64(x, bound));  // x - bound wraps above x when x < bound
}

// Stages whose butterfly partners are 4, 2 or 1 apart: 16 consecutive words hold 8 butterflies; permutes gather
// the x halves and the y halves into two vectors (and back), each lane's root expanded from a short contiguous run.
template <int GAP> struct Lanes;
template <> struct Lanes<4> {
    static constexpr long long x[8] = {0, 1, 2, 3, 8, 9, 10, 11}, y[8] = {4, 5, 6, 7, 12, 13, 14, 15};
    static constexpr long long b0[8] = {0, 1, 2, 3, 8, 9, 10, 11}, b1[8] = {4, 5, 6, 7, 12, 13, 14, 15};
    static constexpr long long r[8] = {0, 0, 0, 0, 1, 1, 1, 1};
};
template <> struct Lanes<2> {
    static constexpr long long x[8] = {0, 1, 4, 5, 8, 9, 12, 13}, y[8] = {2, 3, 6, 7, 10, 11, 14, 15};
    static constexpr long long b0[8] = {0, 1, 8, 9, 2, 3, 10, 11}, b1[8] = {4, 5, 12, 13, 6, 7, 14, 15};
    static constexpr long long r[8] = {0, 0, 1, 1, 2, 2, 3, 3};
};
template <> struct Lanes<1> {
    static constexpr long long x[8] = {0, 2, 4, 6, 8, 10, 12, 14}, y[8] = {1, 3, 5, 7, 9, 11, 13, 15};
    static constexpr long long b0[8] = {0, 8, 1, 9, 2, 10, 3, 11}, b1[8] = {4, 12, 5, 13, 6, 14, 7, 15};
    static constexpr long long r[8] = {0, 1, 2, 3, 4, 5, 6, 7};
};
constexpr long long Lanes<4>::x[8], Lanes<4>::y[8], Lanes<4>::b0[8], Lanes<4>::b1[8], Lanes<4>::r[8];
constexpr long long Lanes<2>::x[8], Lanes<2>::y[8], Lanes<2>::b0[8], Lanes<2>::b1[8], Lanes<2>::r[8];
constexpr long long Lanes<1>::x[8], Lanes<1>::y[8], Lanes<1>::b0[8], Lanes<1>::b1[8], Lanes<1>::r[8];

template <int GAP>
MEDHE_IFMA inline void roots_for(const u64* w, const u64* wq, std::size_t first, __m512i& vw, __m512i& vwq) {
    const __m512i idx = _mm512_loadu_si512(Lanes<GAP>::r);
    const __mmask8 k = __mmask8((1u << (8 / GAP)) - 1);
    vw = _mm512_permutexvar_epi64(idx, _mm512_maskz_loadu_epi64(k, w + first));
    vwq = _mm512_permutexvar_epi64(idx, _mm512_maskz_loadu_epi64(k, wq + first));
}

// One forward stage with butterflies GAP apart; m = number of groups (roots m .. 2m-1).
template <int GAP, bool NARROW>
MEDHE_IFMA void small_gaps_forward(u64* a, const NTTTables& t, const Quot52& qt, std::size_t m, __m512i vq,
                                   __m512i v2q) {
    const __m512i ix = _mm512_loadu_si512(Lanes<GAP>::x), iy = _mm512_loadu_si512(Lanes<GAP>::y);
    const __m512i ib0 = _mm512_loadu_si512(Lanes<GAP>::b0), ib1 = _mm512_loadu_si512(Lanes<GAP>::b1);
    for (std::size_t c = 0; c < t.n; c += 16) {
        __m512i v0 = _mm512_loadu_si512(a + c), v1 = _mm512_loadu_si512(a + c + 8);
        __m512i x = _mm512_permutex2var_epi64(v0, ix, v1), y = _mm512_permutex2var_epi64(v0, iy, v1);
        __m512i w, wq;
        roots_for<GAP>(t.root_w.data(), qt.fwd, m + c / (2 * GAP), w, wq);
        __m512i u = sub_if_ge(x, v2q);
        __m512i v = mul_shoup52(y, w, wq, vq);
        __m512i nx = _mm512_add_epi64(u, v), ny = _mm512_sub_epi64(_mm512_add_epi64(u, v2q), v);
        if (NARROW) {
            nx = sub_if_ge(nx, v2q);
            ny = sub_if_ge(ny, v2q);
        }
        _mm512_storeu_si512(a + c, _mm512_permutex2var_epi64(nx, ib0, ny));
        _mm512_storeu_si512(a + c + 8, _mm512_permutex2var_epi64(nx, ib1, ny));
    }
}

template <int GAP, bool NARROW>
MEDHE_IFMA void small_gaps_inverse(u64* a, const NTTTables& t, const Quot52& qt, std::size_t m, __m512i vq,
                                   __m512i v2q) {
    const __m512i ix = _mm512_loadu_si512(Lanes<GAP>::x), iy = _mm512_loadu_si512(Lanes<GAP>::y);
    const __m512i ib0 = _mm512_loadu_si512(Lanes<GAP>::b0), ib1 = _mm512_loadu_si512(Lanes<GAP>::b1);
    for (std::size_t c = 0; c < t.n; c += 16) {
        __m512i v0 = _mm512_loadu_si512(a + c), v1 = _mm512_loadu_si512(a + c + 8);
        __m512i x = _mm512_permutex2var_epi64(v0, ix, v1), y = _mm512_permutex2var_epi64(v0, iy, v1);
        __m512i w, wq;
        roots_for<GAP>(t.inv_w.data(), qt.inv, m + c / (2 * GAP), w, wq);
        __m512i nx = sub_if_ge(_mm512_add_epi64(x, y), v2q);
        __m512i d = _mm512_sub_epi64(_mm512_add_epi64(x, v2q), y);
        if (NARROW) d = sub_if_ge(d, v2q);
        __m512i ny = mul_shoup52(d, w, wq, vq);
        _mm512_storeu_si512(a + c, _mm512_permutex2var_epi64(nx, ib0, ny));
        _mm512_storeu_si512(a + c + 8, _mm512_permutex2var_epi64(nx, ib1, ny));
    }
}

}  // namespace

// NARROW: primes in [2^50, 2^51): every value is kept below 2q < 2^52 (one more reduction per butterfly output).
template <bool NARROW>
MEDHE_IFMA void ifma_ntt_forward_impl(u64* a, const NTTTables& t, bool reduce) {
    const Quot52 qt = quot52(t);
    const u64 q = t.mod.q;
    const std::size_t n = t.n;
    const __m512i vq = _mm512_set1_epi64(long(q)), v2q = _mm512_set1_epi64(long(2 * q));
    std::size_t m = 1, gap = n >> 1;
    for (; gap >= 8; m <<= 1, gap >>= 1) {
        for (std::size_t i = 0; i < m; ++i) {
            const __m512i w = _mm512_set1_epi64(long(t.root_w[m + i]));
            const __m512i wq = _mm512_set1_epi64(long(qt.fwd[m + i]));
            u64* x = a + 2 * i * gap;
            u64* y = x + gap;
            for (std::size_t j = 0; j < gap; j += 8) {
                __m512i u = sub_if_ge(_mm512_loadu_si512(x + j), v2q);
                __m512i v = mul_shoup52(_mm512_loadu_si512(y + j), w, wq, vq);
                __m512i nx = _mm512_add_epi64(u, v), ny = _mm512_sub_epi64(_mm512_add_epi64(u, v2q), v);
                if (NARROW) {
                    nx = sub_if_ge(nx, v2q);
                    ny = sub_if_ge(ny, v2q);
                }
                _mm512_storeu_si512(x + j, nx);
                _mm512_storeu_si512(y + j, ny);
            }
        }
    }
    small_gaps_forward<4, NARROW>(a, t, qt, m, vq, v2q);
    small_gaps_forward<2, NARROW>(a, t, qt, m << 1, vq, v2q);
    small_gaps_forward<1, NARROW>(a, t, qt, m << 2, vq, v2q);
    if (reduce) {
        for (std::size_t j = 0; j < n; j += 8) {
            __m512i x = _mm512_loadu_si512(a + j);
            x = sub_if_ge(sub_if_ge(x, v2q), vq);
            _mm512_storeu_si512(a + j, x);
        }
    }
}

template <bool NARROW>
MEDHE_IFMA void ifma_ntt_inverse_impl(u64* a, const NTTTables& t) {
    const Quot52 qt = quot52(t);
    const u64 q = t.mod.q, two_q = 2 * q;
    const std::size_t n = t.n;
    const __m512i vq0 = _mm512_set1_epi64(long(q)), v2q0 = _mm512_set1_epi64(long(two_q));
    small_gaps_inverse<1, NARROW>(a, t, qt, n >> 1, vq0, v2q0);
    small_gaps_inverse<2, NARROW>(a, t, qt, n >> 2, vq0, v2q0);
    small_gaps_inverse<4, NARROW>(a, t, qt, n >> 3, vq0, v2q0);
    std::size_t m = n >> 4, gap = 8;
    const __m512i vq = _mm512_set1_epi64(long(q)), v2q = _mm512_set1_epi64(long(two_q));
    for (; m >= 1; m >>= 1, gap <<= 1) {
        for (std::size_t i = 0; i < m; ++i) {
            const __m512i w = _mm512_set1_epi64(long(t.inv_w[m + i]));
            const __m512i wq = _mm512_set1_epi64(long(qt.inv[m + i]));
            u64* x = a + 2 * i * gap;
            u64* y = x + gap;
            for (std::size_t j = 0; j < gap; j += 8) {
                __m512i u = _mm512_loadu_si512(x + j), v = _mm512_loadu_si512(y + j);
                _mm512_storeu_si512(x + j, sub_if_ge(_mm512_add_epi64(u, v), v2q));
                __m512i d = _mm512_sub_epi64(_mm512_add_epi64(u, v2q), v);
                if (NARROW) d = sub_if_ge(d, v2q);
                _mm512_storeu_si512(y + j, mul_shoup52(d, w, wq, vq));
            }
        }
    }
    const __m512i w = _mm512_set1_epi64(long(qt.inv_n_w)), wq = _mm512_set1_epi64(long(qt.inv_n_q52));
    for (std::size_t j = 0; j < n; j += 8) {
        __m512i x = mul_shoup52(_mm512_loadu_si512(a + j), w, wq, vq);
        _mm512_storeu_si512(a + j, sub_if_ge(x, vq));
    }
}

void ifma_ntt_forward(u64* a, const NTTTables& t, bool reduce) {
    if (t.mod.q < (u64(1) << 50)) ifma_ntt_forward_impl<false>(a, t, reduce);
    else ifma_ntt_forward_impl<true>(a, t, reduce);
}

void ifma_ntt_inverse(u64* a, const NTTTables& t) {
    if (t.mod.q < (u64(1) << 50)) ifma_ntt_inverse_impl<false>(a, t);
    else ifma_ntt_inverse_impl<true>(a, t);
}

MEDHE_IFMA void ifma_dyadic_mul(u64* out, const u64* a, const u64* b, std::size_t n, const Modulus& m, bool accumulate) {
    const u64 q = m.q;
    const int s = m.bits - 1;
    const u64 barrett = static_cast<u64>((static_cast<u128>(1) << (s + 52)) / q);  // < 2^52 since q > 2^s
    const __m512i vq = _mm512_set1_epi64(long(q)), v2q = _mm512_set1_epi64(long(2 * q));
    const __m512i vb = _mm512_set1_epi64(long(barrett)), zero = _mm512_setzero_si512();
    const __m512i mask = _mm512_set1_epi64((1LL << 52) - 1);
    const __m128i shift_lo = _mm_cvtsi32_si128(s), shift_hi = _mm_cvtsi32_si128(52 - s);
    std::size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m512i x = _mm512_loadu_si512(a + j), y = _mm512_loadu_si512(b + j);
        __m512i lo = _mm512_madd52lo_epu64(zero, x, y);
        __m512i hi = _mm512_madd52hi_epu64(zero, x, y);
        __m512i top = _mm512_or_si512(_mm512_srl_epi64(lo, shift_lo), _mm512_sll_epi64(hi, shift_hi));
        __m512i quot = _mm512_madd52hi_epu64(zero, top, vb);
        __m512i r = _mm512_and_si512(_mm512_sub_epi64(lo, _mm512_madd52lo_epu64(zero, quot, vq)), mask);
        r = sub_if_ge(sub_if_ge(r, v2q), vq);
        if (accumulate) r = sub_if_ge(_mm512_add_epi64(r, _mm512_loadu_si512(out + j)), vq);
        _mm512_storeu_si512(out + j, r);
    }
    for (; j < n; ++j) {
        u64 p = m.mul(a[j], b[j]);
        out[j] = accumulate ? m.add(out[j], p) : p;
    }
}

}  // namespace medhe

namespace medhe {

// Key-switch inner product for one target prime: out_k (+)= sum_j d_j[perm] * key_j,k mod q, k = 0, 1.
// The 104-bit products accumulate as separate low and high 52-bit halves (exact, no reduction inside the sum),
// then hi * 2^52 + lo is reduced with two Shoup products, which needs hi < 2^52: for wide primes the sum is folded
// back to [0, q) every `fold` digits (fold * q^2 < 2^104).
bool ifma_key_product_fits(std::size_t digits, const Modulus& m) {
    (void)digits;
    return m.q < (u64(1) << 51);
}

// (hi 2^52 + lo) mod q for hi + lo / 2^52 < 2^52.
MEDHE_IFMA inline __m512i fold_sum(__m512i lo, __m512i hi, __m512i w_hi, __m512i wq_hi, __m512i w_one,
                                   __m512i wq_one, __m512i vq, __m512i v2q) {
    const __m512i mask = _mm512_set1_epi64((1LL << 52) - 1);
    __m512i h = _mm512_add_epi64(hi, _mm512_srli_epi64(lo, 52));
    __m512i l = _mm512_and_si512(lo, mask);
    __m512i v = _mm512_add_epi64(mul_shoup52(h, w_hi, wq_hi, vq), mul_shoup52(l, w_one, wq_one, vq));
    return sub_if_ge(sub_if_ge(v, v2q), vq);
}

MEDHE_IFMA void ifma_key_product(u64* out0, u64* out1, const u64* const* d, const u64* const* k0,
                                 const u64* const* k1, std::size_t digits, const uint32_t* perm, std::size_t n,
                                 const Modulus& m, bool accumulate) {
    const u64 q = m.q;
    const u64 two52 = static_cast<u64>((static_cast<u128>(1) << 52) % q);
    const __m512i vq = _mm512_set1_epi64(long(q)), v2q = _mm512_set1_epi64(long(2 * q));
    const __m512i w_hi = _mm512_set1_epi64(long(two52)), wq_hi = _mm512_set1_epi64(long(shoup52(two52, q)));
    const __m512i w_one = _mm512_set1_epi64(1), wq_one = _mm512_set1_epi64(long(shoup52(1, q)));
    const __m512i zero = _mm512_setzero_si512();
    // products fit 2*bits bits; hi (bits 52..) of a sum of `fold` of them plus a folded value stays below 2^52
    const int excess = 2 * m.bits - 52;
    // (and the low halves, < fold * 2^52, stay below 2^64)
    std::size_t fold = excess <= 0 ? digits : std::max<std::size_t>(1, (std::size_t(1) << std::min(52 - excess, 11)) - 2);
    fold = std::min<std::size_t>(std::max<std::size_t>(fold, 1), 2040);
    for (std::size_t c = 0; c < n; c += 8) {
        __m512i lo0 = zero, hi0 = zero, lo1 = zero, hi1 = zero;
        const __m256i idx = perm ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm + c)) : _mm256_setzero_si256();
        std::size_t since = 0;
        for (std::size_t j = 0; j < digits; ++j) {
            if (since == fold) {
                lo0 = fold_sum(lo0, hi0, w_hi, wq_hi, w_one, wq_one, vq, v2q);
                lo1 = fold_sum(lo1, hi1, w_hi, wq_hi, w_one, wq_one, vq, v2q);
                hi0 = hi1 = zero;
                since = 0;
            }
            __m512i x = perm ? _mm512_i32gather_epi64(idx, reinterpret_cast<const long long*>(d[j]), 8)
                             : _mm512_loadu_si512(d[j] + c);
            __m512i a = _mm512_loadu_si512(k0[j] + c), b = _mm512_loadu_si512(k1[j] + c);
            lo0 = _mm512_madd52lo_epu64(lo0, x, a);
            hi0 = _mm512_madd52hi_epu64(hi0, x, a);
            lo1 = _mm512_madd52lo_epu64(lo1, x, b);
            hi1 = _mm512_madd52hi_epu64(hi1, x, b);
            ++since;
        }
        __m512i r[2] = {fold_sum(lo0, hi0, w_hi, wq_hi, w_one, wq_one, vq, v2q),
                        fold_sum(lo1, hi1, w_hi, wq_hi, w_one, wq_one, vq, v2q)};
        if (accumulate) {
            r[0] = sub_if_ge(_mm512_add_epi64(r[0], _mm512_loadu_si512(out0 + c)), vq);
            r[1] = sub_if_ge(_mm512_add_epi64(r[1], _mm512_loadu_si512(out1 + c)), vq);
        }
        _mm512_storeu_si512(out0 + c, r[0]);
        _mm512_storeu_si512(out1 + c, r[1]);
    }
}

}  // namespace medhe

namespace medhe {

// dst = (src mod q - sub) mod q for src < 2^52, sub < q: the digit lift of rescale and mod-down.
MEDHE_IFMA void ifma_lift_sub(u64* dst, const u64* src, std::size_t n, u64 q, u64 sub) {
    const __m512i vq = _mm512_set1_epi64(long(q)), one = _mm512_set1_epi64(1);
    const __m512i wq = _mm512_set1_epi64(long(shoup52(1, q))), vs = _mm512_set1_epi64(long(q - sub));
    for (std::size_t j = 0; j < n; j += 8) {
        __m512i x = sub_if_ge(mul_shoup52(_mm512_loadu_si512(src + j), one, wq, vq), vq);
        _mm512_storeu_si512(dst + j, sub_if_ge(_mm512_add_epi64(x, vs), vq));
    }
}

// out = (a - t) * c mod q, plus out's old value when accumulate; a, t, out in [0, q).
MEDHE_IFMA void ifma_sub_mul(u64* out, const u64* a, const u64* t, std::size_t n, u64 q, u64 c, bool accumulate) {
    const __m512i vq = _mm512_set1_epi64(long(q)), w = _mm512_set1_epi64(long(c));
    const __m512i wq = _mm512_set1_epi64(long(shoup52(c, q)));
    for (std::size_t j = 0; j < n; j += 8) {
        __m512i d = _mm512_sub_epi64(_mm512_add_epi64(_mm512_loadu_si512(a + j), vq), _mm512_loadu_si512(t + j));
        __m512i r = sub_if_ge(mul_shoup52(d, w, wq, vq), vq);
        if (accumulate) r = sub_if_ge(_mm512_add_epi64(r, _mm512_loadu_si512(out + j)), vq);
        _mm512_storeu_si512(out + j, r);
    }
}

}  // namespace medhe
