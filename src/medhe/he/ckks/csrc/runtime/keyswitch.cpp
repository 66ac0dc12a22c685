// Key switching (relinearization, rotations, conjugation) in SEAL's RNS form with one special prime P; keys in
// the hybrid format (several primes per digit, k special primes) go through hybrid.cpp's three steps instead.
//
// For a polynomial c at level l: digit j is c mod q_j (coefficient form), lifted to every prime of q_0..q_l, P
// and brought back to NTT form (the digit's own prime keeps c's NTT limb); the key product sums digit_j * key_j
// per prime, and the division by P with rounding (SEAL's mod-down) adds the result to the ciphertext. Every step
// is exact modular arithmetic in SEAL's order, so relinearize / rotate / conjugate equal SEAL's word for word.
// The hoisted variants reuse one decomposition for many Galois elements (the automorphism is a permutation of NTT
// slots, applied to the digits) and share one mod-down across a sum of rotations; their digits lift the rotated
// coefficients differently from SEAL, so they decrypt to the same values with different noise, not identical bytes.
#include "runtime.h"

namespace medhe {

// ifma.cpp
bool ifma_key_product_fits(std::size_t digits, const Modulus& m);
void ifma_key_product(u64* out0, u64* out1, const u64* const* d, const u64* const* k0, const u64* const* k1,
                      std::size_t digits, const uint32_t* perm, std::size_t n, const Modulus& m, bool accumulate);

void decompose(const Context& ctx, const u64* poly, int level, Decomposed& out, bool centered) {
    const std::size_t n = ctx.n, digits = std::size_t(level) + 1, targets = digits + 1;
    out.level = level;
    out.n = n;
    out.digits = digits;
    out.width = targets;
    out.data.resize(digits * targets * n);
    Words coeff(digits * n);
    parallel_for(digits, [&](std::size_t j) {
        u64* c = coeff.data() + j * n;
        std::memcpy(c, poly + j * n, n * 8);
        ntt_inverse(c, ctx.tables[j]);
    });
    parallel_for(digits * targets, [&](std::size_t task) {
        std::size_t j = task / targets, t = task % targets;
        u64* dst = out.at(j, t);
        if (t == j) {
            std::memcpy(dst, poly + j * n, n * 8);
            return;
        }
        const NTTTables& tab = t < digits ? ctx.tables[t] : ctx.special();
        const u64* c = coeff.data() + j * n;
        if (centered) {  // digit in (-q_j/2, q_j/2]: commutes with the automorphism's sign changes
            const u64 qj = ctx.primes[j], half = qj >> 1;
            for (std::size_t i = 0; i < n; ++i) {
                if (c[i] <= half) {
                    dst[i] = tab.mod.reduce64(c[i]);
                } else {
                    u64 r = tab.mod.reduce64(qj - c[i]);
                    dst[i] = r ? tab.mod.q - r : 0;
                }
            }
        } else if (ctx.primes[j] > tab.mod.q) {
            for (std::size_t i = 0; i < n; ++i) dst[i] = tab.mod.reduce64(c[i]);
        } else {
            std::memcpy(dst, c, n * 8);
        }
        ntt_forward(dst, tab);
    });
}

static void check_key(const SwitchKey& key, int level, std::size_t n) {
    if (key.alpha != 0) throw InputError("key switch: a hybrid key reached SEAL's key product");
    if (key.max_level < level || key.digits < std::size_t(level) + 1 || key.n != n)
        throw InputError("evaluation key does not cover level " + std::to_string(level) +
                         ": create keys with this server's spec");
}

void key_product(const Context& ctx, const Decomposed& d, const SwitchKey& key, const uint32_t* perm, Extended& acc,
                 bool accumulate) {
    const int level = d.level;
    const std::size_t n = ctx.n, digits = std::size_t(level) + 1, targets = digits + 1;
    check_key(key, level, n);
    if (d.width != targets) throw InputError("key switch: decomposition does not match the key's format");
    if (!accumulate) {
        acc.level = level;
        acc.n = n;
        acc.width = targets;
        acc.data.resize(2 * targets * n);
    } else if (acc.level != level || acc.width != targets) {
        throw InputError("key switch: accumulating across levels");
    }
    constexpr std::size_t B = 256;
    parallel_for(targets, [&](std::size_t t) {
        const std::size_t key_limb = t < digits ? t : key.key_limbs - 1;
        const Modulus& m = t < digits ? ctx.tables[t].mod : ctx.special().mod;
        u64* out0 = acc.at(0, t);
        u64* out1 = acc.at(1, t);
        if (ifma_enabled() && ifma_key_product_fits(digits, m) && n % 8 == 0) {
            std::vector<const u64*> dp(digits), k0(digits), k1(digits);
            // a Galois permutation is applied with scalar loads into scratch: vector gathers are slow on CPUs
            // with the gather-data-sampling mitigation, and the digits stay in L2 either way
            thread_local std::vector<u64> scratch;
            if (perm) scratch.resize(digits * n);
            for (std::size_t j = 0; j < digits; ++j) {
                dp[j] = d.at(j, t);
                if (perm) {
                    u64* dst = scratch.data() + j * n;
                    const u64* src = dp[j];
                    for (std::size_t c = 0; c < n; ++c) dst[c] = src[perm[c]];
                    dp[j] = dst;
                }
                k0[j] = key.part(j, 0, key_limb);
                k1[j] = key.part(j, 1, key_limb);
            }
            ifma_key_product(out0, out1, dp.data(), k0.data(), k1.data(), digits, nullptr, n, m, accumulate);
            return;
        }
        u128 a0[B], a1[B];
        for (std::size_t base = 0; base < n; base += B) {
            for (std::size_t c = 0; c < B; ++c) a0[c] = a1[c] = 0;
            for (std::size_t j = 0; j < digits; ++j) {
                const u64* dj = d.at(j, t);
                const u64* k0 = key.part(j, 0, key_limb) + base;
                const u64* k1 = key.part(j, 1, key_limb) + base;
                if (perm) {
                    const uint32_t* pm = perm + base;
                    for (std::size_t c = 0; c < B; ++c) {
                        u64 x = dj[pm[c]];
                        a0[c] += static_cast<u128>(x) * k0[c];
                        a1[c] += static_cast<u128>(x) * k1[c];
                    }
                } else {
                    const u64* x = dj + base;
                    for (std::size_t c = 0; c < B; ++c) {
                        a0[c] += static_cast<u128>(x[c]) * k0[c];
                        a1[c] += static_cast<u128>(x[c]) * k1[c];
                    }
                }
            }
            if (accumulate) {
                for (std::size_t c = 0; c < B; ++c) {
                    out0[base + c] = m.add(out0[base + c], m.reduce128(a0[c]));
                    out1[base + c] = m.add(out1[base + c], m.reduce128(a1[c]));
                }
            } else {
                for (std::size_t c = 0; c < B; ++c) {
                    out0[base + c] = m.reduce128(a0[c]);
                    out1[base + c] = m.reduce128(a1[c]);
                }
            }
        }
    });
}

void mod_down_add(const Context& ctx, const Extended& acc, Ciphertext& ct) {
    const int level = acc.level;
    const std::size_t n = ctx.n, digits = std::size_t(level) + 1;
    if (ct.level != level || ct.size < 2 || acc.width != digits + 1)
        throw InputError("key switch: ciphertext does not match");
    const NTTTables& sp = ctx.special();
    const u64 p = sp.mod.q, half = p >> 1;
    Words last(2 * n);
    parallel_for(2, [&](std::size_t k) {
        u64* t = last.data() + k * n;
        std::memcpy(t, acc.at(int(k), digits), n * 8);
        ntt_inverse(t, sp);
        for (std::size_t i = 0; i < n; ++i) {
            u64 v = t[i] + half;
            t[i] = v >= p ? v - p : v;
        }
    });
    parallel_for(2 * digits, [&](std::size_t task) {
        int k = int(task / digits);
        std::size_t i = task % digits;
        const NTTTables& tab = ctx.tables[i];
        const Modulus& m = tab.mod;
        const u64 half_i = m.reduce64(half);
        Words tmp(n);
        u64* t = tmp.data();
        const u64* src = last.data() + std::size_t(k) * n;
        if (ifma_enabled() && m.q < (u64(1) << 50) && n % 8 == 0) {
            if (p < (u64(1) << 52)) {
                ifma_lift_sub(t, src, n, m.q, half_i);
            } else {
                for (std::size_t c = 0; c < n; ++c) t[c] = m.sub(m.reduce64(src[c]), half_i);
            }
            ntt_forward(t, tab);
            ifma_sub_mul(ct.limb(k, int(i)), acc.at(k, i), t, n, m.q, ctx.inv_special[i].w, true);
            return;
        }
        if (p > m.q) {
            for (std::size_t c = 0; c < n; ++c) t[c] = m.sub(m.reduce64(src[c]), half_i);
        } else {
            for (std::size_t c = 0; c < n; ++c) t[c] = m.sub(src[c], half_i);
        }
        ntt_forward(t, tab);
        const u64* a = acc.at(k, i);
        u64* o = ct.limb(k, int(i));
        const ShoupConst& inv = ctx.inv_special[i];
        for (std::size_t c = 0; c < n; ++c) o[c] = m.add(o[c], mul_shoup(m.sub(a[c], t[c]), inv, m.q));
    });
}

// The three steps in whichever format `key` has (SEAL's or hybrid); one key set is always one format.
static void split(const Context& ctx, const u64* poly, int level, const SwitchKey& key, bool centered, Decomposed& d) {
    if (key.alpha) hybrid_mod_up(ctx, poly, level, key.alpha, d);
    else decompose(ctx, poly, level, d, centered);
}

static void product(const Context& ctx, const Decomposed& d, const SwitchKey& key, const uint32_t* perm, Extended& acc,
                    bool accumulate) {
    if (key.alpha) hybrid_key_product(ctx, d, key, perm, acc, accumulate);
    else key_product(ctx, d, key, perm, acc, accumulate);
}

static void down(const Context& ctx, const Extended& acc, const SwitchKey& key, Ciphertext& ct) {
    if (key.alpha) hybrid_mod_down_add(ctx, acc, ct);
    else mod_down_add(ctx, acc, ct);
}

Ciphertext relinearize(const Context& ctx, const Ciphertext& a, const KeySet& keys) {
    if (a.size == 2) return a;
    if (a.size != 3) throw InputError("relinearize: expects a ciphertext with 3 polynomials");
    if (!keys.has_relin()) throw InputError("relinearization keys are missing: create them with this server's spec");
    const SwitchKey& key = *keys.relin;
    Decomposed d;
    split(ctx, a.poly(2), a.level, key, false, d);
    Extended acc;
    product(ctx, d, key, nullptr, acc, false);
    Ciphertext out;
    out.allocate(2, a.level, a.n);
    out.scale = a.scale;
    std::memcpy(out.data.data(), a.data.data(), std::size_t(2) * a.limbs() * a.n * 8);
    down(ctx, acc, key, out);
    return out;
}

static void check_two(const Ciphertext& a, const char* op) {
    if (a.size != 2) throw InputError(std::string(op) + ": expects a ciphertext with 2 polynomials (relinearize first)");
}

Ciphertext rotate_galois(const Context& ctx, const Ciphertext& a, uint32_t elt, const KeySet& keys) {
    check_two(a, "rotate");
    const SwitchKey& key = keys.galois_key(elt);
    Ciphertext out;
    out.allocate(2, a.level, a.n);
    out.scale = a.scale;
    apply_galois(ctx, a.poly(0), out.poly(0), a.limbs(), elt);
    Words rotated(std::size_t(a.limbs()) * a.n);
    apply_galois(ctx, a.poly(1), rotated.data(), a.limbs(), elt);
    std::memset(out.poly(1), 0, std::size_t(a.limbs()) * a.n * 8);
    Decomposed d;
    split(ctx, rotated.data(), a.level, key, false, d);
    Extended acc;
    product(ctx, d, key, nullptr, acc, false);
    down(ctx, acc, key, out);
    return out;
}

std::vector<Ciphertext> rotate_hoisted(const Context& ctx, const Ciphertext& a, const std::vector<uint32_t>& elts,
                                       const KeySet& keys) {
    check_two(a, "rotate");
    if (elts.empty()) return {};
    for (uint32_t e : elts) keys.galois_key(e);  // fail before any work
    const SwitchKey& first = keys.galois_key(elts[0]);
    for (uint32_t e : elts)
        if (keys.galois_key(e).alpha != first.alpha) throw InputError("rotate: Galois keys of mixed formats");
    Decomposed d;
    split(ctx, a.poly(1), a.level, first, true, d);
    std::vector<Ciphertext> outs(elts.size());
    Extended acc;
    for (std::size_t g = 0; g < elts.size(); ++g) {
        Ciphertext& out = outs[g];
        out.allocate(2, a.level, a.n);
        out.scale = a.scale;
        apply_galois(ctx, a.poly(0), out.poly(0), a.limbs(), elts[g]);
        std::memset(out.poly(1), 0, std::size_t(a.limbs()) * a.n * 8);
        const SwitchKey& key = keys.galois_key(elts[g]);
        product(ctx, d, key, ctx.galois_table(elts[g]).data(), acc, false);
        down(ctx, acc, key, out);
    }
    return outs;
}

Ciphertext rotate_sum(const Context& ctx, const std::vector<const Ciphertext*>& cts, const std::vector<uint32_t>& elts,
                      const KeySet& keys) {
    if (cts.empty() || cts.size() != elts.size()) throw InputError("rotate_sum: needs one Galois element per ciphertext");
    const Ciphertext& first = *cts[0];
    for (const Ciphertext* c : cts) {
        check_two(*c, "rotate");
        check_same(first, *c, "add");
    }
    const SwitchKey* format = nullptr;
    for (uint32_t e : elts) {
        if (e == 1) continue;
        const SwitchKey& k = keys.galois_key(e);
        if (format && format->alpha != k.alpha) throw InputError("rotate: Galois keys of mixed formats");
        format = &k;
    }
    Ciphertext out;
    out.allocate(2, first.level, first.n, true);
    out.scale = first.scale;
    const std::size_t limbs = std::size_t(first.limbs()), n = first.n;
    Words tmp(limbs * n);
    Extended acc;
    bool have_acc = false;
    Decomposed d;
    for (std::size_t g = 0; g < cts.size(); ++g) {
        const Ciphertext& c = *cts[g];
        if (elts[g] == 1) {
            add_inplace(ctx, out, c);
            continue;
        }
        const SwitchKey& key = keys.galois_key(elts[g]);
        apply_galois(ctx, c.poly(0), tmp.data(), int(limbs), elts[g]);
        for (std::size_t i = 0; i < limbs; ++i)
            poly_add(out.limb(0, int(i)), out.limb(0, int(i)), tmp.data() + i * n, n, ctx.primes[i]);
        apply_galois(ctx, c.poly(1), tmp.data(), int(limbs), elts[g]);
        split(ctx, tmp.data(), c.level, key, true, d);
        product(ctx, d, key, nullptr, acc, have_acc);
        have_acc = true;
    }
    if (have_acc) down(ctx, acc, *format, out);
    return out;
}

}  // namespace medhe
