// medhe's native CKKS runtime: SEAL-layout RNS ciphertexts and the operations a compiled plan runs on them.
//
// Layout (SEAL's): a ciphertext at level l (SEAL chain index) has size polynomials, each l+1 residue limbs of n
// words in NTT form, limb i modulo data prime i. Evaluation keys, SEAL's format: for each decomposition digit j
// (one per data prime), two polynomials over all data primes plus the special prime P ("key level"). Hybrid format
// (hybrid.cpp): digits over groups of `alpha` data primes, k special primes whose product P covers each group.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "modarith.h"
#include "ntt.h"

namespace medhe {

// Raised for anything wrong with caller data (bytes, levels, scales, keys); becomes CiphertextError in Python.
struct InputError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// 64-byte aligned word buffer (vector kernels load whole cache lines).
class Words {
public:
    Words() = default;
    explicit Words(std::size_t count, bool zero = false) { resize(count, zero); }
    Words(const Words& o) { resize(o.n_); if (n_) std::memcpy(p_, o.p_, n_ * 8); }
    Words& operator=(const Words& o) { if (this != &o) { resize(o.n_); if (n_) std::memcpy(p_, o.p_, n_ * 8); } return *this; }
    Words(Words&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
    Words& operator=(Words&& o) noexcept { std::swap(p_, o.p_); std::swap(n_, o.n_); return *this; }
    ~Words() { std::free(p_); }
    void resize(std::size_t count, bool zero = false) {
        if (count != n_) {
            std::free(p_);
            p_ = count ? static_cast<u64*>(std::aligned_alloc(64, ((count * 8 + 63) / 64) * 64)) : nullptr;
            if (count && !p_) throw std::bad_alloc();
            n_ = count;
        }
        if (zero && n_) std::memset(p_, 0, n_ * 8);
    }
    u64* data() { return p_; }
    const u64* data() const { return p_; }
    std::size_t size() const { return n_; }

private:
    u64* p_ = nullptr;
    std::size_t n_ = 0;
};

// ---- kernels chosen at run time (kernels.cpp): AVX-512 IFMA where the CPU and the prime allow, else portable
void ntt_forward(u64* a, const NTTTables& t);   // [0, q) -> [0, q)
void ntt_forward_lazy(u64* a, const NTTTables& t);  // [0, 2q) -> [0, 4q)
void ntt_inverse(u64* a, const NTTTables& t);   // [0, 2q) -> [0, q)
void dyadic_mul(u64* out, const u64* a, const u64* b, std::size_t n, const Modulus& m);      // out = a*b
void dyadic_mul_acc(u64* out, const u64* a, const u64* b, std::size_t n, const Modulus& m);  // out += a*b
void poly_add(u64* out, const u64* a, const u64* b, std::size_t n, u64 q);
void poly_sub(u64* out, const u64* a, const u64* b, std::size_t n, u64 q);
void poly_neg(u64* out, const u64* a, std::size_t n, u64 q);
void poly_mul_scalar(u64* out, const u64* a, std::size_t n, const ShoupConst& c, u64 q);
bool ifma_available();
// IFMA elementwise helpers; callers check ifma_enabled() and q < 2^50, source values < 2^52
void ifma_lift_sub(u64* dst, const u64* src, std::size_t n, u64 q, u64 sub);
void ifma_sub_mul(u64* out, const u64* a, const u64* t, std::size_t n, u64 q, u64 c, bool accumulate);

bool ifma_enabled();
void set_isa(const std::string& name);  // "auto" | "portable" | "ifma"
std::string isa_name();

// ---- threads (threads.cpp): a sleeping pool (never spin: the other core may be busy)
void parallel_for(std::size_t count, const std::function<void(std::size_t)>& fn);
void set_threads(int count);
int threads();
std::size_t pool_selftest(std::size_t jobs, std::size_t max_count);  // indices run a wrong number of times

// ---- the prime chain
struct Context {
    int log_n = 0;
    std::size_t n = 0;
    std::vector<u64> primes;  // data primes (level 0 first), then the special prime
    std::vector<NTTTables> tables;
    std::size_t data_count = 0;  // L: data primes; levels are 0..L-1
    std::size_t special_count = 1;  // k: special primes after the data primes (SEAL's format: 1)
    int top_level() const { return int(data_count) - 1; }
    const NTTTables& special() const { return tables[data_count]; }
    // inv_last[l][i] = q_l^-1 mod q_i (rescale from level l), i < l
    std::vector<std::vector<ShoupConst>> inv_last;
    // inv_special[i] = P^-1 mod q_i
    std::vector<ShoupConst> inv_special;
    std::vector<int> bits_at;  // total coefficient modulus bit count per level
    // Hybrid key switching, P = product of the special primes p_m:
    std::vector<ShoupConst> inv_p_all;             // P^-1 mod q_i
    std::vector<ShoupConst> p_hat_inv;             // (P/p_m)^-1 mod p_m
    std::vector<std::vector<u64>> p_hat_mod_q;     // [m][i] = (P/p_m) mod q_i
    std::vector<u64> half_p_mod_q, half_p_mod_p;   // floor(P/2) mod q_i, mod p_m
    std::vector<u64> p_mod_q;                      // P mod q_i
    const NTTTables& special_table(std::size_t m) const { return tables[data_count + m]; }

    Context(const std::vector<u64>& primes, int log_n, std::size_t special_count = 1);
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;
    const std::vector<uint32_t>& galois_table(uint32_t elt) const;  // NTT-domain permutation (SEAL's order)

private:
    mutable std::map<uint32_t, std::vector<uint32_t>> galois_tables_;
    mutable std::mutex galois_lock_;
};

struct Ciphertext {
    int size = 0;
    int level = 0;
    double scale = 1.0;
    std::size_t n = 0;
    Words data;  // size x (level+1) x n
    int limbs() const { return level + 1; }
    u64* poly(int k) { return data.data() + std::size_t(k) * limbs() * n; }
    const u64* poly(int k) const { return data.data() + std::size_t(k) * limbs() * n; }
    u64* limb(int k, int i) { return poly(k) + std::size_t(i) * n; }
    const u64* limb(int k, int i) const { return poly(k) + std::size_t(i) * n; }
    void allocate(int size_, int level_, std::size_t n_, bool zero = false) {
        size = size_; level = level_; n = n_;
        data.resize(std::size_t(size) * limbs() * n, zero);
    }
};

struct Plaintext {
    int level = 0;
    double scale = 1.0;
    std::size_t n = 0;
    Words data;  // (level+1) x n, NTT form
    const u64* limb(int i) const { return data.data() + std::size_t(i) * n; }
};

// One key-switching key: digits x 2 x (L+1) x n, NTT form, at the key level. `levels` = highest level the key can
// serve (trimmed keys carry zeros above it).
// Hybrid keys (alpha > 0): digit j covers data primes [j alpha, (j+1) alpha), limbs are the L data primes then the
// k special primes.
struct SwitchKey {
    std::size_t digits = 0, key_limbs = 0, n = 0;
    int max_level = -1;
    std::size_t alpha = 0;  // data primes per digit; 0 = SEAL's format (one special prime, a digit per prime)
    Words data;
    const u64* part(std::size_t digit, int k, std::size_t limb) const {
        return data.data() + ((digit * 2 + std::size_t(k)) * key_limbs + limb) * n;
    }
};

struct KeySet {
    std::map<uint32_t, SwitchKey> galois;  // by Galois element
    std::shared_ptr<SwitchKey> relin;      // may be null
    bool has_relin() const { return relin != nullptr; }
    const SwitchKey& galois_key(uint32_t elt) const;
};

// ---- arithmetic.cpp
void check_same(const Ciphertext& a, const Ciphertext& b, const char* op);
bool scales_close(double a, double b);
Ciphertext add(const Context& ctx, const Ciphertext& a, const Ciphertext& b);
void add_inplace(const Context& ctx, Ciphertext& a, const Ciphertext& b);
Ciphertext sub(const Context& ctx, const Ciphertext& a, const Ciphertext& b);
Ciphertext negate(const Context& ctx, const Ciphertext& a);
Ciphertext add_plain(const Context& ctx, const Ciphertext& a, const Plaintext& p);
Ciphertext multiply_plain(const Context& ctx, const Ciphertext& a, const Plaintext& p);
void multiply_plain_acc(const Context& ctx, Ciphertext& acc, const Ciphertext& a, const Plaintext& p, bool first);
Ciphertext multiply(const Context& ctx, const Ciphertext& a, const Ciphertext& b);
Ciphertext rescale(const Context& ctx, const Ciphertext& a);
Ciphertext mod_switch(const Context& ctx, const Ciphertext& a, int level);
void apply_galois(const Context& ctx, const u64* in, u64* out, int limbs, uint32_t elt);
void check_scale_bound(const Context& ctx, double scale, int level, const char* op);

// ---- keyswitch.cpp
// Digits of one polynomial at level l, each raised to every target prime (0..l and P), NTT form:
// (l+1) digits x (l+2) targets x n.
// Hybrid keys: digits x (l+1+k) targets (0..l, then the special primes).
struct Decomposed {
    int level = 0;
    Words data;
    std::size_t n = 0;
    std::size_t digits = 0, width = 0;  // width: target primes per digit
    u64* at(std::size_t digit, std::size_t target) { return data.data() + (digit * width + target) * n; }
    const u64* at(std::size_t digit, std::size_t target) const { return data.data() + (digit * width + target) * n; }
};
// A key switch result before the division by P: 2 polynomials over (l+2) primes (0..l, then P); hybrid: (l+1+k).
struct Extended {
    int level = 0;
    std::size_t n = 0, width = 0;
    Words data;  // 2 x width x n
    u64* at(int k, std::size_t target) { return data.data() + (std::size_t(k) * width + target) * n; }
    const u64* at(int k, std::size_t target) const { return data.data() + (std::size_t(k) * width + target) * n; }
};
// centered: lift digits to (-q_j/2, q_j/2] (hoisting) instead of SEAL's [0, q_j) (exact)
void decompose(const Context& ctx, const u64* poly, int level, Decomposed& out, bool centered);
// acc (+)= sum_j perm(D[j]) * key[j]; perm = nullptr for none
void key_product(const Context& ctx, const Decomposed& d, const SwitchKey& key, const uint32_t* perm,
                 Extended& acc, bool accumulate);
// ct.poly(0..1) += round(acc / P)
void mod_down_add(const Context& ctx, const Extended& acc, Ciphertext& ct);
Ciphertext relinearize(const Context& ctx, const Ciphertext& a, const KeySet& keys);
Ciphertext rotate_galois(const Context& ctx, const Ciphertext& a, uint32_t elt, const KeySet& keys);
// Hoisted: one decomposition of a's second polynomial, many Galois elements (not byte-identical to SEAL).
std::vector<Ciphertext> rotate_hoisted(const Context& ctx, const Ciphertext& a, const std::vector<uint32_t>& elts,
                                       const KeySet& keys);
// sum_g rotate(cts[g], elts[g]) with a single division by P (elt 1 = no rotation).
Ciphertext rotate_sum(const Context& ctx, const std::vector<const Ciphertext*>& cts,
                      const std::vector<uint32_t>& elts, const KeySet& keys);

uint32_t galois_elt_from_step(const Context& ctx, long step);

// ---- hybrid.cpp: key switching with hybrid keys (key.alpha > 0)
// ModUp: digit j = c mod Q_j (Q_j: the digit's primes at this level), raised by fast base conversion to every
// other prime of q_0..q_l and the special primes, NTT form.
void hybrid_mod_up(const Context& ctx, const u64* poly, int level, std::size_t alpha, Decomposed& out);
void hybrid_key_product(const Context& ctx, const Decomposed& d, const SwitchKey& key, const uint32_t* perm,
                        Extended& acc, bool accumulate);
// ModDown: ct.poly(0..1) += round(acc / P) (fast base conversion of the special limbs, error below k).
void hybrid_mod_down_add(const Context& ctx, const Extended& acc, Ciphertext& ct);

}  // namespace medhe

namespace medhe {
// ---- seal_bytes.cpp: SEAL's own (uncompressed, unseeded) serialization of ciphertexts and key-switching keys.
// SEAL names parameter levels by a 32-byte parms_id; the caller supplies them (index = level; key level last).
struct SealIds {
    std::vector<std::string> level_pids;  // data levels 0..L-1
    std::string key_pid;
    uint8_t major = 4, minor = 0;
};
Ciphertext load_seal_ciphertext(const Context& ctx, const SealIds& ids, const char* data, std::size_t size);
std::string save_seal_ciphertext(const Context& ctx, const SealIds& ids, const Ciphertext& ct);
// Galois keys by element (index i holds element 2i+1); relinearization keys at index 0.
std::map<uint32_t, SwitchKey> load_seal_kswitch(const Context& ctx, const SealIds& ids, const char* data,
                                                std::size_t size, const char* what);
}  // namespace medhe

namespace medhe {
// ---- program.cpp: a whole compiled plan as a flat op list over numbered registers, run in one call.
enum OpCode : int {
    OP_ADD = 0,          // dst = a + b
    OP_ADD_INPLACE = 1,  // a += b (dst == a)
    OP_NEGATE = 2,       // dst = -a
    OP_ADD_PLAIN = 3,    // dst = a + plain[arg]
    OP_MUL_PLAIN = 4,    // dst = a * plain[arg]
    OP_MUL = 5,          // dst = a * b
    OP_RELIN = 6,        // dst = relinearize(a)
    OP_RESCALE = 7,      // dst = rescale(a)
    OP_MOD_SWITCH = 8,   // dst = a at level arg
    OP_ROTATE = 9,       // dst = galois(a, element arg)
    OP_ROTATE_MANY = 10, // dsts[g] = galois(a, elts[g]) from one decomposition
    OP_ROTATE_SUM = 11,  // dst = sum_g galois(srcs[g], elts[g]) with one mod-down
    OP_MUL_PLAIN_SUM = 12,  // dst = sum_g srcs[g] * plain[plains[g]]
    OP_COPY = 13,        // dst = a
};

struct Op {
    int code = 0, dst = -1, a = -1, b = -1;
    long arg = 0;
    std::vector<int> srcs, dsts, plains;
    std::vector<uint32_t> elts;
    std::vector<int> frees;  // registers dead after this op
};

class Program {
public:
    Program(std::shared_ptr<const Context> ctx, std::vector<Op> ops, std::vector<std::shared_ptr<Plaintext>> plains,
            int registers, int inputs, int output);
    Ciphertext run(std::vector<Ciphertext> inputs, const KeySet& keys) const;
    std::size_t plain_bytes() const;
    int inputs() const { return inputs_; }

private:
    std::shared_ptr<const Context> ctx_;
    std::vector<Op> ops_;
    std::vector<std::shared_ptr<Plaintext>> plains_;
    int registers_, inputs_, output_;
};
}  // namespace medhe
