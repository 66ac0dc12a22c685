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

// Per-table 52-bit Shoup quotients, built once per prime on first use.
struct Quot52 {
    std::vector<u64> fwd, inv;
    u64 inv_n_w = 0, inv_n_q52 = 0;
};

const Quot52& quot52(const NTTTables& t) {
    static std::mutex mu;
    static std::map<const NTTTables*, std::unique_ptr<Quot52>> cache;
    std::lock_guard<std::mutex> lock(mu);
    auto& slot = cache[&t];
    if (!slot) {
        slot.reset(new Quot52);
        slot->fwd.resize(t.n);
        slot->inv.resize(t.n);
        for (std::size_t k = 0; k < t.n; ++k) {
            slot->fwd[k] = shoup52(t.root_w[k], t.mod.q);
            slot->inv[k] = shoup52(t.inv_w[k], t.mod.q);
        }
        slot->inv_n_w = t.inv_n.w;
        slot->inv_n_q52 = shoup52(t.inv_n.w, t.mod.q);
    }
    return *slot;
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

}  // namespace

MEDHE_IFMA void ifma_ntt_forward(u64* a, const NTTTables& t, bool reduce) {
    const Quot52& qt = quot52(t);
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
                _mm512_storeu_si512(x + j, _mm512_add_epi64(u, v));
                _mm512_storeu_si512(y + j, _mm512_sub_epi64(_mm512_add_epi64(u, v2q), v));
            }
        }
    }
    const u64 two_q = 2 * q;
    for (; m < n; m <<= 1, gap >>= 1) {
        for (std::size_t i = 0; i < m; ++i) {
            const ShoupConst w = t.roots[m + i];
            u64* x = a + 2 * i * gap;
            u64* y = x + gap;
            for (std::size_t j = 0; j < gap; ++j) {
                u64 u = x[j];
                u -= (u >= two_q) ? two_q : 0;
                u64 v = mul_shoup_lazy(y[j], w, q);
                x[j] = u + v;
                y[j] = u + two_q - v;
            }
        }
    }
    if (reduce) {
        for (std::size_t j = 0; j < n; j += 8) {
            __m512i x = _mm512_loadu_si512(a + j);
            x = sub_if_ge(sub_if_ge(x, v2q), vq);
            _mm512_storeu_si512(a + j, x);
        }
    }
}

MEDHE_IFMA void ifma_ntt_inverse(u64* a, const NTTTables& t) {
    const Quot52& qt = quot52(t);
    const u64 q = t.mod.q, two_q = 2 * q;
    const std::size_t n = t.n;
    std::size_t m = n >> 1, gap = 1;
    for (; gap < 8 && m >= 1; m >>= 1, gap <<= 1) {
        for (std::size_t i = 0; i < m; ++i) {
            const ShoupConst w = t.inv_roots[m + i];
            u64* x = a + 2 * i * gap;
            u64* y = x + gap;
            for (std::size_t j = 0; j < gap; ++j) {
                u64 u = x[j], v = y[j];
                u64 s = u + v;
                s -= (s >= two_q) ? two_q : 0;
                x[j] = s;
                y[j] = mul_shoup_lazy(u + two_q - v, w, q);
            }
        }
    }
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
                _mm512_storeu_si512(y + j, mul_shoup52(_mm512_sub_epi64(_mm512_add_epi64(u, v2q), v), w, wq, vq));
            }
        }
    }
    const __m512i w = _mm512_set1_epi64(long(qt.inv_n_w)), wq = _mm512_set1_epi64(long(qt.inv_n_q52));
    for (std::size_t j = 0; j < n; j += 8) {
        __m512i x = mul_shoup52(_mm512_loadu_si512(a + j), w, wq, vq);
        _mm512_storeu_si512(a + j, sub_if_ge(x, vq));
    }
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
