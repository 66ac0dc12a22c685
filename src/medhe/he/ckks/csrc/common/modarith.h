// Modular arithmetic on word-sized primes (< 2^61), the base of every CKKS kernel in medhe.
//
// Three multiplication flavours, because each hot loop has a different shape:
//   * Shoup: one operand is a constant known in advance (NTT roots, scalars): precompute w' = floor(w 2^64 / q)
//     and a product costs two multiplications and no division; the result is lazy in [0, 2q).
//   * Barrett: both operands vary (dyadic products, key-switch accumulators): a precomputed floor(2^128 / q)
//     reduces a 128-bit product (or a sum of up to 2^(128-2*bits) of them) with no division.
//   * plain 128-bit %: tables and set-up only.
// Everything here is deterministic integer arithmetic, so any correct reduction gives the same residues as SEAL.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace medhe {

using u64 = std::uint64_t;
using u128 = unsigned __int128;

inline u64 hi64(u128 x) { return static_cast<u64>(x >> 64); }

inline u64 mul_mod_slow(u64 a, u64 b, u64 q) { return static_cast<u64>((static_cast<u128>(a) * b) % q); }

inline u64 pow_mod(u64 base, u64 exp, u64 q) {
    u64 result = 1 % q;
    base %= q;
    while (exp) {
        if (exp & 1) result = mul_mod_slow(result, base, q);
        base = mul_mod_slow(base, base, q);
        exp >>= 1;
    }
    return result;
}

// Inverse of a modulo prime q (Fermat); a must be non-zero mod q.
inline u64 inv_mod(u64 a, u64 q) {
    if (a % q == 0) throw std::invalid_argument("no inverse of 0");
    return pow_mod(a, q - 2, q);
}

// A prime modulus with the constants its reductions need.
struct Modulus {
    u64 q = 0;
    u64 ratio_hi = 0, ratio_lo = 0;  // floor(2^128 / q), high and low words
    int bits = 0;

    Modulus() = default;
    explicit Modulus(u64 value) : q(value) {
        if (value < 2 || value >= (u64(1) << 61)) throw std::invalid_argument("modulus out of range");
        // floor(2^128 / q) = floor((2^128 - 1) / q) since q is not a power of two
        u128 all = ~static_cast<u128>(0);
        u128 ratio = all / q;
        ratio_hi = hi64(ratio);
        ratio_lo = static_cast<u64>(ratio);
        bits = 64 - __builtin_clzll(value);
    }

    // x mod q for a 128-bit x: estimate floor(x / q) from the top 128 bits of x * floor(2^128/q); the estimate is
    // at most one short, fixed by one conditional subtraction.
    inline u64 reduce128(u128 x) const {
        u64 xl = static_cast<u64>(x), xh = hi64(x);
        // (xh 2^64 + xl) * (rh 2^64 + rl) >> 128
        u128 t = static_cast<u128>(xl) * ratio_hi + hi64(static_cast<u128>(xl) * ratio_lo);
        u128 t2 = static_cast<u128>(xh) * ratio_lo + static_cast<u64>(t);
        u64 quot = xh * ratio_hi + hi64(t) + hi64(t2);
        u64 r = xl - quot * q;
        return r >= q ? r - q : r;
    }

    // x mod q for a 64-bit x (Barrett with the high ratio word).
    inline u64 reduce64(u64 x) const {
        u64 quot = hi64(static_cast<u128>(x) * ratio_hi);
        u64 r = x - quot * q;
        return r >= q ? r - q : r;
    }

    inline u64 mul(u64 a, u64 b) const { return reduce128(static_cast<u128>(a) * b); }
    inline u64 add(u64 a, u64 b) const { u64 s = a + b; return s >= q ? s - q : s; }
    inline u64 sub(u64 a, u64 b) const { return a >= b ? a - b : a + q - b; }
    inline u64 neg(u64 a) const { return a ? q - a : 0; }
};

// A constant multiplier with its Shoup quotient.
struct ShoupConst {
    u64 w = 0, wq = 0;  // w < q, wq = floor(w 2^64 / q)
    ShoupConst() = default;
    ShoupConst(u64 value, u64 q) : w(value), wq(static_cast<u64>((static_cast<u128>(value) << 64) / q)) {}
};

// x * w mod q, lazy: result in [0, 2q) for any 64-bit x.
inline u64 mul_shoup_lazy(u64 x, const ShoupConst& c, u64 q) {
    u64 quot = hi64(static_cast<u128>(x) * c.wq);
    return x * c.w - quot * q;
}

inline u64 mul_shoup(u64 x, const ShoupConst& c, u64 q) {
    u64 r = mul_shoup_lazy(x, c, q);
    return r >= q ? r - q : r;
}

inline u64 reverse_bits(u64 x, int bits) {
    u64 r = 0;
    for (int i = 0; i < bits; ++i) r |= ((x >> i) & 1) << (bits - 1 - i);
    return r;
}

// The smallest primitive 2n-th root of unity mod q (SEAL's choice, so NTT outputs agree element for element).
// Requires q = 1 mod 2n. Any primitive root g gives all of them as g^k, k odd; the smallest is unique.
inline u64 minimal_primitive_root(u64 two_n, u64 q) {
    if ((q - 1) % two_n) throw std::invalid_argument("prime is not 1 mod 2n");
    u64 cofactor = (q - 1) / two_n;
    u64 root = 0;
    for (u64 x = 2; x < q; ++x) {
        u64 r = pow_mod(x, cofactor, q);
        if (pow_mod(r, two_n / 2, q) == q - 1) { root = r; break; }  // order exactly 2n (two_n is a power of 2)
    }
    if (!root) throw std::invalid_argument("no primitive root");
    u64 sq = mul_mod_slow(root, root, q), cur = root, best = root;
    for (u64 i = 0; i < two_n; i += 2) {
        if (cur < best) best = cur;
        cur = mul_mod_slow(cur, sq, q);
    }
    return best;
}

}  // namespace medhe
