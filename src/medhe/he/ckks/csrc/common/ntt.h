// Negacyclic NTT over Z_q[X]/(X^n + 1) in SEAL's convention, so medhe's residues equal SEAL's word for word.
//
// Convention (the one SEAL's evaluator assumes for CKKS ciphertexts and plaintexts): psi is the smallest primitive
// 2n-th root of unity mod q, and the forward transform leaves a_hat[k] = a(psi^(2 brv(k) + 1)) (brv: bit reversal
// over log2 n bits). That is what iterative Cooley-Tukey with the roots stored in bit-reversed order computes, with
// group i of the stage that has m groups using psi^brv(m + i); the inverse runs the Gentleman-Sande butterflies
// with the inverse roots at the same indices and scales by n^-1. Butterflies are Harvey's: Shoup constants and
// lazy ranges ([0, 4q) forward, [0, 2q) inverse), one full reduction at the end, valid for q < 2^62.
#pragma once

#include <vector>

#include "modarith.h"

namespace medhe {

struct NTTTables {
    Modulus mod;
    int log_n = 0;
    std::size_t n = 0;
    u64 psi = 0;
    std::vector<ShoupConst> roots;      // roots[k] = psi^brv(k), k in [1, n)
    std::vector<ShoupConst> inv_roots;  // inv_roots[k] = psi^-brv(k)
    ShoupConst inv_n;
    // Plain arrays of the same constants, for vector kernels; *_wq52 = floor(w 2^52 / q) (52-bit multipliers,
    // filled for q < 2^51 only).
    std::vector<u64> root_w, root_wq, inv_w, inv_wq, root_wq52, inv_wq52;
    u64 inv_n_wq52 = 0;

    NTTTables() = default;
    NTTTables(u64 q, int log_degree) : mod(q), log_n(log_degree), n(std::size_t(1) << log_degree) {
        psi = minimal_primitive_root(2 * n, q);
        u64 psi_inv = inv_mod(psi, q);
        roots.resize(n);
        inv_roots.resize(n);
        std::vector<u64> pw(n), ipw(n);
        pw[0] = ipw[0] = 1;
        for (std::size_t i = 1; i < n; ++i) {
            pw[i] = mul_mod_slow(pw[i - 1], psi, q);
            ipw[i] = mul_mod_slow(ipw[i - 1], psi_inv, q);
        }
        for (std::size_t k = 0; k < n; ++k) {
            std::size_t e = reverse_bits(k, log_n);
            roots[k] = ShoupConst(pw[e], q);
            inv_roots[k] = ShoupConst(ipw[e], q);
        }
        inv_n = ShoupConst(inv_mod(n % q, q), q);
        root_w.resize(n); root_wq.resize(n); inv_w.resize(n); inv_wq.resize(n);
        for (std::size_t k = 0; k < n; ++k) {
            root_w[k] = roots[k].w; root_wq[k] = roots[k].wq;
            inv_w[k] = inv_roots[k].w; inv_wq[k] = inv_roots[k].wq;
        }
        if (q < (u64(1) << 51)) {
            auto q52 = [q](u64 w) { return static_cast<u64>((static_cast<u128>(w) << 52) / q); };
            root_wq52.resize(n); inv_wq52.resize(n);
            for (std::size_t k = 0; k < n; ++k) { root_wq52[k] = q52(root_w[k]); inv_wq52[k] = q52(inv_w[k]); }
            inv_n_wq52 = q52(inv_n.w);
        }
    }
};

// Forward NTT in place; input in [0, 4q), output in [0, 4q) (lazy).
inline void ntt_forward_lazy_portable(u64* a, const NTTTables& t) {
    const u64 q = t.mod.q, two_q = 2 * q;
    const std::size_t n = t.n;
    for (std::size_t m = 1, gap = n >> 1; m < n; m <<= 1, gap >>= 1) {
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
}

// Inverse NTT in place (including the 1/n scaling); input in [0, 2q), output in [0, 2q) (lazy).
inline void ntt_inverse_lazy_portable(u64* a, const NTTTables& t) {
    const u64 q = t.mod.q, two_q = 2 * q;
    const std::size_t n = t.n;
    for (std::size_t m = n >> 1, gap = 1; m >= 1; m >>= 1, gap <<= 1) {
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
    for (std::size_t j = 0; j < n; ++j) a[j] = mul_shoup_lazy(a[j], t.inv_n, q);
}

inline void reduce_from_4q(u64* a, std::size_t n, u64 q) {
    const u64 two_q = 2 * q;
    for (std::size_t j = 0; j < n; ++j) {
        u64 x = a[j];
        x -= (x >= two_q) ? two_q : 0;
        x -= (x >= q) ? q : 0;
        a[j] = x;
    }
}

inline void reduce_from_2q(u64* a, std::size_t n, u64 q) {
    for (std::size_t j = 0; j < n; ++j) a[j] -= (a[j] >= q) ? q : 0;
}

}  // namespace medhe
