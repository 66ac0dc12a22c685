// The prime chain: NTT tables per prime, the inverses rescaling and key switching divide by, Galois permutations.
#include "runtime.h"

namespace medhe {

Context::Context(const std::vector<u64>& primes_, int log_degree) : log_n(log_degree), n(std::size_t(1) << log_degree),
                                                                    primes(primes_) {
    if (primes.size() < 2) throw InputError("a CKKS chain needs at least one data prime and the special prime");
    if (log_degree < 1 || log_degree > 17) throw InputError("ring degree out of range");
    data_count = primes.size() - 1;
    for (u64 q : primes) tables.emplace_back(q, log_n);
    inv_last.resize(data_count);
    for (std::size_t l = 1; l < data_count; ++l)
        for (std::size_t i = 0; i < l; ++i) inv_last[l].emplace_back(inv_mod(primes[l] % primes[i], primes[i]), primes[i]);
    u64 p = primes.back();
    for (std::size_t i = 0; i < data_count; ++i) inv_special.emplace_back(inv_mod(p % primes[i], primes[i]), primes[i]);
    int bits = 0;
    for (std::size_t l = 0; l < data_count; ++l) {
        bits += 64 - __builtin_clzll(primes[l]);
        bits_at.push_back(bits);
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
