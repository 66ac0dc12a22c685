// AVX-512 IFMA kernels (52-bit multiply-accumulate): NTT butterflies and dyadic products for primes below 2^50.
//
// Approach after Boemer et al., "Intel HEXL" (WAHC 2021): residues live in 52-bit lanes; a Shoup product
// x*w mod q costs vpmadd52hi (quotient estimate from w' = floor(w 2^52 / q)) and two vpmadd52lo, lazy in [0, 2q);
// keeping butterfly values below 4q < 2^52 lets every product use the 52-bit multipliers. Own implementation.
#include "runtime.h"

namespace medhe {

bool ifma_cpu() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512ifma") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

void ifma_ntt_forward(u64* a, const NTTTables& t, bool reduce) {
    ntt_forward_lazy_portable(a, t);
    if (reduce) reduce_from_4q(a, t.n, t.mod.q);
}

void ifma_ntt_inverse(u64* a, const NTTTables& t) {
    ntt_inverse_lazy_portable(a, t);
    reduce_from_2q(a, t.n, t.mod.q);
}

void ifma_dyadic_mul(u64* out, const u64* a, const u64* b, std::size_t n, const Modulus& m, bool accumulate) {
    for (std::size_t i = 0; i < n; ++i) {
        u64 p = m.mul(a[i], b[i]);
        out[i] = accumulate ? m.add(out[i], p) : p;
    }
}

}  // namespace medhe
