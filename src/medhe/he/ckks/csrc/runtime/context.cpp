// The prime chain: NTT tables per prime, the inverses rescaling and key switching divide by, Galois permutations.
#include "runtime.h"

namespace medhe {

Context::Context(const std::vector<u64>& primes_, int log_degree, std::size_t specials)
    : log_n(log_degree), n(std::size_t(1) << log_degree), primes(primes_), special_count(specials) {
    if (specials < 1 || primes.size() < specials + 1)
        throw InputError("a CKKS chain needs at least one data prime and one special prime");
    if (log_degree < 1 || log_degree > 17) throw InputError("ring degree out of range");
    for (std::size_t i = 0; i < primes.size(); ++i)
        for (std::size_t j = 0; j < i; ++j)
            if (primes[i] == primes[j]) throw InputError("the chain's primes must be distinct");
    data_count = primes.size() - specials;
    for (u64 q : primes) tables.emplace_back(q, log_n);
    inv_last.resize(data_count);
    for (std::size_t l = 1; l < data_count; ++l)
        for (std::size_t i = 0; i < l; ++i) inv_last[l].emplace_back(inv_mod(primes[l] % primes[i], primes[i]), primes[i]);
    u64 p = primes[data_count];
    for (std::size_t i = 0; i < data_count; ++i) inv_special.emplace_back(inv_mod(p % primes[i], primes[i]), primes[i]);
    int bits = 0;
    for (std::size_t l = 0; l < data_count; ++l) {
        bits += 64 - __builtin_clzll(primes[l]);
        bits_at.push_back(bits);
    }
    // P mod r for any prime r, and floor(P/2) = (P - 1)/2 mod r (P is odd)
    auto p_mod = [&](u64 r, std::size_t skip) {
        u64 v = 1 % r;
        for (std::size_t m = 0; m < specials; ++m)
            if (m != skip) v = mul_mod_slow(v, primes[data_count + m] % r, r);
        return v;
    };
    auto half = [&](u64 r) {
        u64 pm = p_mod(r, specials);
        return mul_mod_slow((pm + r - 1) % r, inv_mod(2, r), r);
    };
    for (std::size_t i = 0; i < data_count; ++i) {
        inv_p_all.emplace_back(inv_mod(p_mod(primes[i], specials), primes[i]), primes[i]);
        half_p_mod_q.push_back(half(primes[i]));
        p_mod_q.push_back(p_mod(primes[i], specials));
    }
    p_hat_mod_q.resize(specials);
    for (std::size_t m = 0; m < specials; ++m) {
        const u64 pm = primes[data_count + m];
        p_hat_inv.emplace_back(inv_mod(p_mod(pm, m), pm), pm);
        half_p_mod_p.push_back(half(pm));
        for (std::size_t i = 0; i < data_count; ++i) p_hat_mod_q[m].push_back(p_mod(primes[i], m));
    }
}

// SEAL's NTT-domain automorphism: slot k of the result is slot table[k] of the input.
const std::vector<uint32_t>& Context::galois_table(uint32_t elt) const {
    std::lock_guard<std::mutex> lock(galois_lock_);
    auto it = galois_tables_.find(elt);
    if (it != galois_tables_.end()) return it->second;
    if (!(elt & 1) || elt >= 2 * n) throw InputError("invalid Galois element");
    std::vector<uint32_t> table(n);
    const u64 mask = n - 1;
    for (std::size_t i = n; i < 2 * n; ++i) {
        u64 reversed = reverse_bits(i, log_n + 1);
        u64 index = ((u64(elt) * reversed) >> 1) & mask;
        table[i - n] = uint32_t(reverse_bits(index, log_n));
    }
    return galois_tables_.emplace(elt, std::move(table)).first->second;
}

uint32_t galois_elt_from_step(const Context& ctx, long step) {
    const u64 m = 2 * ctx.n, slots = ctx.n / 2;
    if (step == 0) return uint32_t(m - 1);
    long s = step % long(slots);
    if (s < 0) s += long(slots);
    return uint32_t(pow_mod(3, u64(s), m));
}

const SwitchKey& KeySet::galois_key(uint32_t elt) const {
    auto it = galois.find(elt);
    if (it == galois.end()) throw InputError("no Galois key for element " + std::to_string(elt) +
                                             ": create keys with this server's spec");
    return it->second;
}

}  // namespace medhe
