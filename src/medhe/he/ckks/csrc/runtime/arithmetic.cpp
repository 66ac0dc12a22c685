// NTT-domain ciphertext arithmetic with SEAL's semantics: same checks, same scales, identical residues.
#include <cmath>
#include <limits>

#include "runtime.h"

namespace medhe {

bool scales_close(double a, double b) {
    // SEAL's are_close: relative to the larger magnitude (at least 1), within machine epsilon
    double scale = std::max(std::max(std::fabs(a), std::fabs(b)), 1.0);
    return std::fabs(a - b) < std::numeric_limits<double>::epsilon() * scale;
}

void check_scale_bound(const Context& ctx, double scale, int level, const char* op) {
    if (!std::isnormal(scale) || scale <= 0 || int(std::log2(scale)) >= ctx.bits_at[level])
        throw InputError(std::string(op) + ": scale out of bounds");
}

void check_same(const Ciphertext& a, const Ciphertext& b, const char* op) {
    if (a.level != b.level) throw InputError(std::string(op) + ": operands are at different levels");
    if (!scales_close(a.scale, b.scale)) throw InputError(std::string(op) + ": scale mismatch");
    if (a.n != b.n) throw InputError(std::string(op) + ": ring degree mismatch");
}

static void check_plain(const Ciphertext& a, const Plaintext& p, const char* op) {
    if (a.level != p.level) throw InputError(std::string(op) + ": plaintext is at another level");
    if (a.n != p.n) throw InputError(std::string(op) + ": ring degree mismatch");
}

void add_inplace(const Context& ctx, Ciphertext& a, const Ciphertext& b) {
    check_same(a, b, "add");
    const int big = std::max(a.size, b.size), small = std::min(a.size, b.size);
    if (a.size < big) {  // grow a: keep its polynomials, copy b's extra ones
        Ciphertext grown;
        grown.allocate(big, a.level, a.n);
        std::memcpy(grown.data.data(), a.data.data(), a.data.size() * 8);
        std::memcpy(grown.poly(small), b.poly(small), std::size_t(big - small) * a.limbs() * a.n * 8);
        grown.scale = a.scale;
        a = std::move(grown);
    }
    const std::size_t n = a.n;
    parallel_for(std::size_t(small) * a.limbs(), [&](std::size_t t) {
        int k = int(t / a.limbs()), i = int(t % a.limbs());
        poly_add(a.limb(k, i), a.limb(k, i), b.limb(k, i), n, ctx.primes[i]);
    });
}

Ciphertext add(const Context& ctx, const Ciphertext& a, const Ciphertext& b) {
    Ciphertext out = a;
    add_inplace(ctx, out, b);
    return out;
}

Ciphertext sub(const Context& ctx, const Ciphertext& a, const Ciphertext& b) {
    check_same(a, b, "sub");
    if (a.size != b.size) throw InputError("sub: operands of different sizes");
    Ciphertext out;
    out.allocate(a.size, a.level, a.n);
    out.scale = a.scale;
    for (int k = 0; k < a.size; ++k)
        for (int i = 0; i < a.limbs(); ++i) poly_sub(out.limb(k, i), a.limb(k, i), b.limb(k, i), a.n, ctx.primes[i]);
    return out;
}

Ciphertext negate(const Context& ctx, const Ciphertext& a) {
    Ciphertext out;
    out.allocate(a.size, a.level, a.n);
    out.scale = a.scale;
    for (int k = 0; k < a.size; ++k)
        for (int i = 0; i < a.limbs(); ++i) poly_neg(out.limb(k, i), a.limb(k, i), a.n, ctx.primes[i]);
    return out;
}

Ciphertext add_plain(const Context& ctx, const Ciphertext& a, const Plaintext& p) {
    check_plain(a, p, "add_plain");
    if (!scales_close(a.scale, p.scale)) throw InputError("add_plain: scale mismatch");
    Ciphertext out = a;
    for (int i = 0; i < a.limbs(); ++i) poly_add(out.limb(0, i), a.limb(0, i), p.limb(i), a.n, ctx.primes[i]);
    return out;
}

Ciphertext multiply_plain(const Context& ctx, const Ciphertext& a, const Plaintext& p) {
    check_plain(a, p, "multiply_plain");
    Ciphertext out;
    out.allocate(a.size, a.level, a.n);
    out.scale = a.scale * p.scale;
    check_scale_bound(ctx, out.scale, a.level, "multiply_plain");
    parallel_for(std::size_t(a.size) * a.limbs(), [&](std::size_t t) {
        int k = int(t / a.limbs()), i = int(t % a.limbs());
        dyadic_mul(out.limb(k, i), a.limb(k, i), p.limb(i), a.n, ctx.tables[i].mod);
    });
    return out;
}

// acc = a*p (first) or acc += a*p: the plaintext products of one linear group, without temporaries.
void multiply_plain_acc(const Context& ctx, Ciphertext& acc, const Ciphertext& a, const Plaintext& p, bool first) {
    check_plain(a, p, "multiply_plain");
    double scale = a.scale * p.scale;
    if (first) {
        acc.allocate(a.size, a.level, a.n);
        acc.scale = scale;
        check_scale_bound(ctx, scale, a.level, "multiply_plain");
    } else {
        if (acc.level != a.level || acc.size != a.size) throw InputError("add: operands are at different levels");
        if (!scales_close(acc.scale, scale)) throw InputError("add: scale mismatch");
    }
    parallel_for(std::size_t(a.size) * a.limbs(), [&](std::size_t t) {
        int k = int(t / a.limbs()), i = int(t % a.limbs());
        if (first) dyadic_mul(acc.limb(k, i), a.limb(k, i), p.limb(i), a.n, ctx.tables[i].mod);
        else dyadic_mul_acc(acc.limb(k, i), a.limb(k, i), p.limb(i), a.n, ctx.tables[i].mod);
    });
}

Ciphertext multiply(const Context& ctx, const Ciphertext& a, const Ciphertext& b) {
    if (a.level != b.level) throw InputError("multiply: operands are at different levels");
    if (a.size != 2 || b.size != 2) throw InputError("multiply: operands must have 2 polynomials (relinearize first)");
    Ciphertext out;
    out.allocate(3, a.level, a.n);
    out.scale = a.scale * b.scale;
    check_scale_bound(ctx, out.scale, a.level, "multiply");
    const std::size_t n = a.n;
    parallel_for(std::size_t(a.limbs()), [&](std::size_t i) {
        const Modulus& m = ctx.tables[i].mod;
        dyadic_mul(out.limb(0, int(i)), a.limb(0, int(i)), b.limb(0, int(i)), n, m);
        dyadic_mul(out.limb(1, int(i)), a.limb(0, int(i)), b.limb(1, int(i)), n, m);
        dyadic_mul_acc(out.limb(1, int(i)), a.limb(1, int(i)), b.limb(0, int(i)), n, m);
        dyadic_mul(out.limb(2, int(i)), a.limb(1, int(i)), b.limb(1, int(i)), n, m);
    });
    return out;
}

// Divide by the last prime q_l with rounding: out_i = (c_i - [(c_l + q_l/2) mod q_l - q_l/2]_i) * q_l^-1 mod q_i.
Ciphertext rescale(const Context& ctx, const Ciphertext& a) {
    if (a.level == 0) throw InputError("rescale: no prime left to divide by (level 0)");
    const int l = a.level;
    double scale = a.scale / double(ctx.primes[l]);
    check_scale_bound(ctx, a.scale, l, "rescale");
    check_scale_bound(ctx, scale, l - 1, "rescale");
    Ciphertext out;
    out.allocate(a.size, l - 1, a.n);
    out.scale = scale;
    const std::size_t n = a.n;
    const u64 ql = ctx.primes[l], half = ql >> 1;
    std::vector<Words> last(a.size, Words(n));
    parallel_for(std::size_t(a.size), [&](std::size_t k) {
        u64* t = last[k].data();
        std::memcpy(t, a.limb(int(k), l), n * 8);
        ntt_inverse(t, ctx.tables[l]);
        for (std::size_t j = 0; j < n; ++j) {
            u64 v = t[j] + half;
            t[j] = v >= ql ? v - ql : v;
        }
    });
    parallel_for(std::size_t(a.size) * l, [&](std::size_t task) {
        int k = int(task / l), i = int(task % l);
        const NTTTables& tab = ctx.tables[i];
        const u64 qi = tab.mod.q;
        const u64 half_i = tab.mod.reduce64(half);
        Words tmp(n);
        u64* t = tmp.data();
        const u64* src = last[k].data();
        if (ifma_enabled() && qi < (u64(1) << 50) && ql < (u64(1) << 52) && n % 8 == 0) {
            ifma_lift_sub(t, src, n, qi, half_i);
            ntt_forward(t, tab);
            ifma_sub_mul(out.limb(k, i), a.limb(k, i), t, n, qi, ctx.inv_last[l][i].w, false);
            return;
        }
        for (std::size_t j = 0; j < n; ++j) t[j] = tab.mod.sub(tab.mod.reduce64(src[j]), half_i);
        ntt_forward(t, tab);
        const u64* c = a.limb(k, i);
        u64* o = out.limb(k, i);
        const ShoupConst& inv = ctx.inv_last[l][i];
        for (std::size_t j = 0; j < n; ++j) o[j] = mul_shoup(tab.mod.sub(c[j], t[j]), inv, qi);
    });
    return out;
}

Ciphertext mod_switch(const Context& ctx, const Ciphertext& a, int level) {
    (void)ctx;
    if (level > a.level || level < 0) throw InputError("mod_switch: can only switch down to an existing level");
    if (level == a.level) return a;
    Ciphertext out;
    out.allocate(a.size, level, a.n);
    out.scale = a.scale;
    for (int k = 0; k < a.size; ++k) std::memcpy(out.poly(k), a.poly(k), std::size_t(level + 1) * a.n * 8);
    return out;
}

void apply_galois(const Context& ctx, const u64* in, u64* out, int limbs, uint32_t elt) {
    const auto& table = ctx.galois_table(elt);
    const std::size_t n = ctx.n;
    for (int i = 0; i < limbs; ++i) {
        const u64* src = in + std::size_t(i) * n;
        u64* dst = out + std::size_t(i) * n;
        for (std::size_t j = 0; j < n; ++j) dst[j] = src[table[j]];
    }
}

}  // namespace medhe
