// Elementwise and transform kernels, with the instruction set chosen once at run time.
//
// The AVX-512 IFMA versions (ifma.cpp) need 4q < 2^52 (primes below 2^50); other primes, CPUs without IFMA, and
// MEDHE_NATIVE_ISA=portable take the portable path. Both give identical residues.
#include <cstdlib>

#include "runtime.h"

namespace medhe {

// ifma.cpp
bool ifma_cpu();
void ifma_ntt_forward(u64* a, const NTTTables& t, bool reduce);
void ifma_ntt_inverse(u64* a, const NTTTables& t);
void ifma_dyadic_mul(u64* out, const u64* a, const u64* b, std::size_t n, const Modulus& m, bool accumulate);

namespace {
int initial_isa() {
    const char* env = std::getenv("MEDHE_NATIVE_ISA");
    std::string want = env ? env : "auto";
    if (want == "portable") return 0;
    return ifma_cpu() ? 1 : 0;
}
std::atomic<int> g_isa{initial_isa()};

inline bool use_ifma(u64 q) { return g_isa.load(std::memory_order_relaxed) == 1 && q < (u64(1) << 50); }
// full-range transforms also run on IFMA for primes below 2^51 (values kept below 2q)
inline bool use_ifma_ntt(u64 q) { return g_isa.load(std::memory_order_relaxed) == 1 && q < (u64(1) << 51); }
}  // namespace

bool ifma_available() { return ifma_cpu(); }
bool ifma_enabled() { return g_isa.load() == 1; }
std::string isa_name() { return ifma_enabled() ? "avx512ifma" : "portable"; }

void set_isa(const std::string& name) {
    if (name == "portable") g_isa = 0;
    else if (name == "ifma") {
        if (!ifma_cpu()) throw InputError("this CPU has no AVX-512 IFMA");
        g_isa = 1;
    } else if (name == "auto") g_isa = ifma_cpu() ? 1 : 0;
    else throw InputError("ISA must be auto, portable or ifma");
}

void ntt_forward(u64* a, const NTTTables& t) {
    if (use_ifma_ntt(t.mod.q)) return ifma_ntt_forward(a, t, true);
    ntt_forward_lazy_portable(a, t);
    reduce_from_4q(a, t.n, t.mod.q);
}

void ntt_forward_lazy(u64* a, const NTTTables& t) {
    if (use_ifma(t.mod.q)) return ifma_ntt_forward(a, t, false);
    ntt_forward_lazy_portable(a, t);
}

void ntt_inverse(u64* a, const NTTTables& t) {
    if (use_ifma_ntt(t.mod.q)) return ifma_ntt_inverse(a, t);
    ntt_inverse_lazy_portable(a, t);
    reduce_from_2q(a, t.n, t.mod.q);
}

void dyadic_mul(u64* out, const u64* a, const u64* b, std::size_t n, const Modulus& m) {
    if (use_ifma(m.q)) return ifma_dyadic_mul(out, a, b, n, m, false);
    for (std::size_t i = 0; i < n; ++i) out[i] = m.mul(a[i], b[i]);
}

void dyadic_mul_acc(u64* out, const u64* a, const u64* b, std::size_t n, const Modulus& m) {
    if (use_ifma(m.q)) return ifma_dyadic_mul(out, a, b, n, m, true);
    for (std::size_t i = 0; i < n; ++i) out[i] = m.add(out[i], m.mul(a[i], b[i]));
}

void poly_add(u64* out, const u64* a, const u64* b, std::size_t n, u64 q) {
    for (std::size_t i = 0; i < n; ++i) {
        u64 s = a[i] + b[i];
        out[i] = s >= q ? s - q : s;
    }
}

void poly_sub(u64* out, const u64* a, const u64* b, std::size_t n, u64 q) {
    for (std::size_t i = 0; i < n; ++i) {
        u64 d = a[i] - b[i];
        out[i] = a[i] >= b[i] ? d : d + q;
    }
}

void poly_neg(u64* out, const u64* a, std::size_t n, u64 q) {
    for (std::size_t i = 0; i < n; ++i) out[i] = a[i] ? q - a[i] : 0;
}

void poly_mul_scalar(u64* out, const u64* a, std::size_t n, const ShoupConst& c, u64 q) {
    for (std::size_t i = 0; i < n; ++i) out[i] = mul_shoup(a[i], c, q);
}

}  // namespace medhe
