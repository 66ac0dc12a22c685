// Hybrid key switching (Han & Ki, CT-RSA 2020): few digits, several special primes.
//
// SEAL's format decomposes over every data prime with one special prime, so a key grows with L^2. Here the data
// primes are grouped, alpha per digit, and the k special primes p_m (product P) are at least as large as a group.
// For a polynomial c at level l (limbs 0..l, NTT form):
//   ModUp   digit j: Q_j = the product of the digit's primes present at level l; y_i = [c_i (Q_j/q_i)^-1]_{q_i}
//           in coefficient form, x = sum_i y_i (Q_j/q_i) - v Q_j on every other prime, v = round(sum_i y_i/q_i)
//           in floating point, NTT. x is c's centered residue mod Q_j: an uncentered one (mean Q_j/2) would couple
//           with the sum of the key's errors into a bias of ~ (Q_j/P) sqrt(N) sigma on every coefficient. Any
//           multiple of Q_j (a wrong v) vanishes against the key's gadget, so v needs no exactness.
//   product acc = sum_j x_j * key_j on q_0..q_l and the special primes (key limbs above l are not read).
//   ModDown ct += (acc - [acc + floor(P/2)]_P + floor(P/2)) / P on q_0..q_l: the special limbs in coefficient
//           form, converted to each q_i the same fast way, with the overflow u P (u < k) removed by a
//           floating-point estimate of u (exact unless [acc + floor(P/2)]_P lies within ~2^-50 P of 0 or P, which
//           costs that coefficient +-1), then a multiplication by P^-1: round(acc / P).
// The key for digit j encrypts P g_j s' with g_j = 1 mod the digit's primes and 0 mod the other data primes, so
// sum_j x_j P g_j s' = P c s' mod Q_l P at every level l. With alpha = 1 and k = 1 these are SEAL's steps with
// centered digits, so SEAL's own keys give the bytes of the SEAL path's hoisted rotations (tests check it).
// Hoisting works unchanged: the automorphism, a permutation of NTT slots, maps the lift of c to a lift of the
// rotated c of the same size.
#include "runtime.h"

namespace medhe {

namespace {

struct Digit {
    std::size_t first = 0, count = 0;  // data primes first .. first + count - 1 (those at or below the level)
};

Digit digit_at(std::size_t j, std::size_t alpha, std::size_t limbs) {
    Digit d;
    d.first = j * alpha;
    d.count = std::min(alpha, limbs - d.first);
    return d;
}

// (Q_j / q_i) mod r for the digit's prime i (product of its other primes)
u64 q_hat_mod(const Context& ctx, const Digit& d, std::size_t i, u64 r) {
    u64 v = 1 % r;
    for (std::size_t m = d.first; m < d.first + d.count; ++m)
        if (m != i) v = mul_mod_slow(v, ctx.primes[m] % r, r);
    return v;
}

const NTTTables& target_table(const Context& ctx, std::size_t t, std::size_t limbs) {
    return t < limbs ? ctx.tables[t] : ctx.special_table(t - limbs);
}

}  // namespace

void hybrid_mod_up(const Context& ctx, const u64* poly, int level, std::size_t alpha, Decomposed& out) {
    if (alpha == 0) throw InputError("key switch: a hybrid key needs at least one prime per digit");
    const std::size_t n = ctx.n, limbs = std::size_t(level) + 1, k = ctx.special_count;
    const std::size_t width = limbs + k, digits = (limbs + alpha - 1) / alpha;
    out.level = level;
    out.n = n;
    out.digits = digits;
    out.width = width;
    out.data.resize(digits * width * n);
    // y_i = [c_i (Q_j/q_i)^-1]_{q_i}, coefficient form
    Words y(limbs * n);
    parallel_for(limbs, [&](std::size_t i) {
        u64* c = y.data() + i * n;
        std::memcpy(c, poly + i * n, n * 8);
        ntt_inverse(c, ctx.tables[i]);
        const Digit d = digit_at(i / alpha, alpha, limbs);
        if (d.count == 1) return;
        const u64 q = ctx.primes[i];
        const ShoupConst w(inv_mod(q_hat_mod(ctx, d, i, q), q), q);
        for (std::size_t c_ = 0; c_ < n; ++c_) c[c_] = mul_shoup(c[c_], w, q);
    });
    // v = round(sum_i y_i / q_i) per coefficient: sum_i y_i (Q_j/q_i) - v Q_j is c's centered residue mod Q_j
    // (a wrong v near a tie only moves the lift by Q_j, which the gadget absorbs)
    std::vector<std::vector<int64_t>> shift(digits);
    parallel_for(digits, [&](std::size_t j) {
        const Digit d = digit_at(j, alpha, limbs);
        if (d.count == 1) return;
        std::vector<double> inv(d.count);
        for (std::size_t i = 0; i < d.count; ++i) inv[i] = 1.0 / double(ctx.primes[d.first + i]);
        std::vector<int64_t>& v = shift[j];
        v.resize(n);
        for (std::size_t c = 0; c < n; ++c) {
            double f = 0;
            for (std::size_t i = 0; i < d.count; ++i) f += double(y.data()[(d.first + i) * n + c]) * inv[i];
            v[c] = int64_t(f + 0.5);
        }
    });
    parallel_for(digits * width, [&](std::size_t task) {
        const std::size_t j = task / width, t = task % width;
        const Digit d = digit_at(j, alpha, limbs);
        u64* dst = out.at(j, t);
        if (t >= d.first && t < d.first + d.count) {  // the digit's own primes: c itself
            std::memcpy(dst, poly + t * n, n * 8);
            return;
        }
        const NTTTables& tab = target_table(ctx, t, limbs);
        const Modulus& m = tab.mod;
        if (d.count == 1) {  // centered as the SEAL path's hoisted digits, so SEAL's keys give its bytes
            const u64* src = y.data() + d.first * n;
            const u64 qj = ctx.primes[d.first], half = qj >> 1;
            for (std::size_t c = 0; c < n; ++c) {
                if (src[c] <= half) {
                    dst[c] = m.reduce64(src[c]);
                } else {
                    const u64 r = m.reduce64(qj - src[c]);
                    dst[c] = r ? m.q - r : 0;
                }
            }
        } else {
            std::vector<u64> w(d.count);
            for (std::size_t i = 0; i < d.count; ++i) w[i] = q_hat_mod(ctx, d, d.first + i, m.q);
            u64 qj_mod = 1 % m.q;
            for (std::size_t i = 0; i < d.count; ++i) qj_mod = mul_mod_slow(qj_mod, ctx.primes[d.first + i] % m.q, m.q);
            const int64_t* v = shift[j].data();
            constexpr std::size_t B = 256;
            u128 acc[B];
            for (std::size_t base = 0; base < n; base += B) {
                const std::size_t len = std::min(B, n - base);
                for (std::size_t c = 0; c < len; ++c) acc[c] = 0;
                for (std::size_t i = 0; i < d.count; ++i) {
                    const u64* src = y.data() + (d.first + i) * n + base;
                    const u64 wi = w[i];
                    for (std::size_t c = 0; c < len; ++c) acc[c] += static_cast<u128>(src[c]) * wi;
                }
                for (std::size_t c = 0; c < len; ++c)
                    dst[base + c] = m.sub(m.reduce128(acc[c]), m.reduce64(u64(v[base + c]) * qj_mod));
            }
        }
        ntt_forward(dst, tab);
    });
}

void hybrid_key_product(const Context& ctx, const Decomposed& d, const SwitchKey& key, const uint32_t* perm,
                        Extended& acc, bool accumulate) {
    const int level = d.level;
    const std::size_t n = ctx.n, limbs = std::size_t(level) + 1, k = ctx.special_count, width = limbs + k;
    if (key.alpha == 0 || key.n != n || key.key_limbs != ctx.data_count + k || d.width != width ||
        key.digits < d.digits || key.max_level < level)
        throw InputError("evaluation key does not cover level " + std::to_string(level) +
                         ": create keys with this server's spec");
    if (!accumulate) {
        acc.level = level;
        acc.n = n;
        acc.width = width;
        acc.data.resize(2 * width * n);
    } else if (acc.level != level || acc.width != width) {
        throw InputError("key switch: accumulating across levels");
    }
    // products < 2^122 (primes < 2^61): a u128 holds the sum of up to 64 digits
    if (d.digits > 64) throw InputError("key switch: too many digits");
    parallel_for(width, [&](std::size_t t) {
        const std::size_t key_limb = t < limbs ? t : ctx.data_count + (t - limbs);
        const Modulus& m = target_table(ctx, t, limbs).mod;
        u64* out0 = acc.at(0, t);
        u64* out1 = acc.at(1, t);
        constexpr std::size_t B = 256;
        u128 a0[B], a1[B];
        for (std::size_t base = 0; base < n; base += B) {
            const std::size_t len = std::min(B, n - base);
            for (std::size_t c = 0; c < len; ++c) a0[c] = a1[c] = 0;
            for (std::size_t j = 0; j < d.digits; ++j) {
                const u64* dj = d.at(j, t);
                const u64* k0 = key.part(j, 0, key_limb) + base;
                const u64* k1 = key.part(j, 1, key_limb) + base;
                if (perm) {
                    const uint32_t* pm = perm + base;
                    for (std::size_t c = 0; c < len; ++c) {
                        const u64 x = dj[pm[c]];
                        a0[c] += static_cast<u128>(x) * k0[c];
                        a1[c] += static_cast<u128>(x) * k1[c];
                    }
                } else {
                    const u64* x = dj + base;
                    for (std::size_t c = 0; c < len; ++c) {
                        a0[c] += static_cast<u128>(x[c]) * k0[c];
                        a1[c] += static_cast<u128>(x[c]) * k1[c];
                    }
                }
            }
            for (std::size_t c = 0; c < len; ++c) {
                const u64 r0 = m.reduce128(a0[c]), r1 = m.reduce128(a1[c]);
                out0[base + c] = accumulate ? m.add(out0[base + c], r0) : r0;
                out1[base + c] = accumulate ? m.add(out1[base + c], r1) : r1;
            }
        }
    });
}

void hybrid_mod_down_add(const Context& ctx, const Extended& acc, Ciphertext& ct) {
    const int level = acc.level;
    const std::size_t n = ctx.n, limbs = std::size_t(level) + 1, k = ctx.special_count;
    if (ct.level != level || ct.size < 2 || acc.width != limbs + k)
        throw InputError("key switch: ciphertext does not match");
    // y_m = [(acc_m + floor(P/2)) (P/p_m)^-1]_{p_m}, coefficient form, for both polynomials
    Words y(2 * k * n);
    parallel_for(2 * k, [&](std::size_t task) {
        const std::size_t poly = task / k, m = task % k;
        const NTTTables& tab = ctx.special_table(m);
        const u64 p = tab.mod.q, h = ctx.half_p_mod_p[m];
        u64* v = y.data() + task * n;
        std::memcpy(v, acc.at(int(poly), limbs + m), n * 8);
        ntt_inverse(v, tab);
        if (k == 1) {
            for (std::size_t c = 0; c < n; ++c) v[c] = tab.mod.add(v[c], h);
        } else {
            const ShoupConst& w = ctx.p_hat_inv[m];
            for (std::size_t c = 0; c < n; ++c) v[c] = mul_shoup(tab.mod.add(v[c], h), w, p);
        }
    });
    parallel_for(2 * limbs, [&](std::size_t task) {
        const std::size_t poly = task / limbs, i = task % limbs;
        const NTTTables& tab = ctx.tables[i];
        const Modulus& m = tab.mod;
        const u64 h = ctx.half_p_mod_q[i];
        Words tmp(n);
        u64* t = tmp.data();
        const u64* ys = y.data() + poly * k * n;
        if (k == 1) {
            const bool wide = ctx.special_table(0).mod.q > m.q;
            for (std::size_t c = 0; c < n; ++c) t[c] = m.sub(wide ? m.reduce64(ys[c]) : ys[c], h);
        } else {
            // sum_m y_m (P/p_m) = [z]_P + u P with u = floor(sum_m y_m / p_m) < k: subtract u P too, or the
            // result is off by u, whose mean (k-1)/2 times s biases every slot
            std::vector<u64> w(k);
            std::vector<double> inv(k);
            for (std::size_t mm = 0; mm < k; ++mm) {
                w[mm] = ctx.p_hat_mod_q[mm][i];
                inv[mm] = 1.0 / double(ctx.special_table(mm).mod.q);
            }
            const u64 p_mod = ctx.p_mod_q[i];
            for (std::size_t c = 0; c < n; ++c) {
                u128 s = 0;
                double f = 0;
                for (std::size_t mm = 0; mm < k; ++mm) {
                    const u64 v = ys[mm * n + c];
                    s += static_cast<u128>(v) * w[mm];
                    f += double(v) * inv[mm];
                }
                const u64 u = u64(f);  // floor: f >= 0
                t[c] = m.sub(m.sub(m.reduce128(s), m.reduce64(u * p_mod)), h);
            }
        }
        ntt_forward(t, tab);
        const u64* a = acc.at(int(poly), i);
        u64* o = ct.limb(int(poly), int(i));
        const ShoupConst& inv = ctx.inv_p_all[i];
        for (std::size_t c = 0; c < n; ++c) o[c] = m.add(o[c], mul_shoup(m.sub(a[c], t[c]), inv, m.q));
    });
}

}  // namespace medhe
