// SEAL's byte layout at the boundary: ciphertexts and keys arrive as SEAL's serialization (after medhe's wire
// format has been expanded and SEAL has expanded the seeds), the output leaves the same way, so seal-python on the
// client decrypts it unchanged. Every field is checked; anything off raises InputError, never reads out of bounds.
#include <cmath>

#include "runtime.h"

namespace medhe {

namespace {

constexpr uint16_t kMagic = 0xA15E;
constexpr std::size_t kHeader = 16;

struct Reader {
    const char* p;
    std::size_t size, pos = 0;
    const char* what;
    void need(std::size_t k) const {
        if (k > size - pos) throw InputError(std::string(what) + " is truncated or malformed: send the complete bytes again");
    }
    template <typename T> T get() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, p + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }
    const char* take(std::size_t k) {
        need(k);
        const char* r = p + pos;
        pos += k;
        return r;
    }
};

// Reads a SEAL header; returns the byte count it declares for the whole object (header included).
std::size_t header(Reader& r) {
    std::size_t start = r.pos;
    uint16_t magic = r.get<uint16_t>();
    uint8_t hsize = r.get<uint8_t>(), major = r.get<uint8_t>();
    r.get<uint8_t>();
    uint8_t compr = r.get<uint8_t>();
    r.get<uint16_t>();
    uint64_t total = r.get<uint64_t>();
    if (magic != kMagic || hsize != kHeader) throw InputError(std::string(r.what) + " is not SEAL data (bad header)");
    if (major != 4) throw InputError(std::string(r.what) + " does not come from SEAL 4.x");
    if (compr != 0) throw InputError(std::string(r.what) + " uses SEAL compression; medhe expects none");
    if (total < kHeader || total > r.size - start) throw InputError(std::string(r.what) + " is truncated or malformed: send the complete bytes again");
    return total;
}

void put_header(std::string& out, uint64_t total, uint8_t major, uint8_t minor) {
    char h[kHeader] = {};
    uint16_t magic = kMagic;
    std::memcpy(h, &magic, 2);
    h[2] = char(kHeader);
    h[3] = char(major);
    h[4] = char(minor);
    std::memcpy(h + 8, &total, 8);
    out.append(h, kHeader);
}

template <typename T> void put(std::string& out, T v) { out.append(reinterpret_cast<const char*>(&v), sizeof(T)); }

struct Meta {
    std::string pid;
    uint8_t ntt;
    uint64_t size, degree, limbs;
    double scale;
    const char* coeffs;
};

// One serialized SEAL Ciphertext (also the layout of each key component).
Meta ciphertext_blob(Reader& r) {
    std::size_t start = r.pos;
    std::size_t total = header(r);
    Meta m;
    m.pid.assign(r.take(32), 32);
    m.ntt = r.get<uint8_t>();
    m.size = r.get<uint64_t>();
    m.degree = r.get<uint64_t>();
    m.limbs = r.get<uint64_t>();
    m.scale = r.get<double>();
    r.get<uint64_t>();  // correction factor (BGV)
    header(r);          // the coefficient DynArray
    uint64_t count = r.get<uint64_t>();
    if (m.size > 16 || m.limbs > 64 || m.degree > (1u << 17) || count != m.size * m.limbs * m.degree)
        throw InputError(std::string(r.what) + " declares sizes that do not fit together");
    m.coeffs = r.take(count * 8);
    if (r.pos - start != total) throw InputError(std::string(r.what) + " has a wrong size field");
    return m;
}

void copy_checked(u64* dst, const char* src, std::size_t n, u64 q, const char* what) {
    std::memcpy(dst, src, n * 8);
    u64 bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad |= (dst[i] >= q);
    if (bad) throw InputError(std::string(what) + " holds a coefficient outside its prime: it is corrupted");
}

}  // namespace

Ciphertext load_seal_ciphertext(const Context& ctx, const SealIds& ids, const char* data, std::size_t size) {
    Reader r{data, size, 0, "ciphertext"};
    Meta m = ciphertext_blob(r);
    if (r.pos != size) throw InputError("ciphertext has unexpected trailing bytes");
    int level = -1;
    for (std::size_t l = 0; l < ids.level_pids.size(); ++l)
        if (ids.level_pids[l] == m.pid) level = int(l);
    if (level < 0) throw InputError("ciphertext was made for other encryption parameters (or at the key level)");
    if (!m.ntt) throw InputError("ciphertext is not in NTT form, so it is not a CKKS ciphertext");
    if (m.degree != ctx.n || m.limbs != std::size_t(level) + 1)
        throw InputError("ciphertext does not match its parameters (ring or modulus count)");
    if (m.size < 2) throw InputError("ciphertext has fewer than 2 polynomials");
    if (!(m.scale > 0) || !std::isfinite(m.scale)) throw InputError("ciphertext has an invalid scale");
    Ciphertext ct;
    ct.allocate(int(m.size), level, ctx.n);
    ct.scale = m.scale;
    for (int k = 0; k < ct.size; ++k)
        for (int i = 0; i <= level; ++i)
            copy_checked(ct.limb(k, i), m.coeffs + ((std::size_t(k) * (level + 1) + i) * ctx.n) * 8, ctx.n,
                         ctx.primes[i], "ciphertext");
    return ct;
}

std::string save_seal_ciphertext(const Context& ctx, const SealIds& ids, const Ciphertext& ct) {
    (void)ctx;
    const std::size_t words = std::size_t(ct.size) * ct.limbs() * ct.n;
    const std::size_t dyn = kHeader + 8 + words * 8;
    const std::size_t total = kHeader + 32 + 1 + 8 * 3 + 8 + 8 + dyn;
    std::string out;
    out.reserve(total);
    put_header(out, total, ids.major, ids.minor);
    out.append(ids.level_pids.at(std::size_t(ct.level)));
    put<uint8_t>(out, 1);
    put<uint64_t>(out, uint64_t(ct.size));
    put<uint64_t>(out, uint64_t(ct.n));
    put<uint64_t>(out, uint64_t(ct.limbs()));
    put<double>(out, ct.scale);
    put<uint64_t>(out, 1);
    put_header(out, dyn, ids.major, ids.minor);
    put<uint64_t>(out, uint64_t(words));
    out.append(reinterpret_cast<const char*>(ct.data.data()), words * 8);
    return out;
}

std::map<uint32_t, SwitchKey> load_seal_kswitch(const Context& ctx, const SealIds& ids, const char* data,
                                                std::size_t size, const char* what) {
    Reader r{data, size, 0, what};
    if (ctx.special_count != 1)
        throw InputError(std::string(what) + " are in SEAL's format, but this model's chain uses hybrid keys: "
                         "create keys with this server's spec");
    std::size_t total = header(r);
    if (total != size) throw InputError(std::string(what) + " has a wrong size field");
    std::string pid(r.take(32), 32);
    if (pid != ids.key_pid) throw InputError(std::string(what) + " were made for other encryption parameters");
    uint64_t outer = r.get<uint64_t>();
    if (outer > 2 * ctx.n) throw InputError(std::string(what) + " declare too many keys");
    const std::size_t key_limbs = ctx.primes.size(), digits = ctx.data_count, n = ctx.n;
    std::map<uint32_t, SwitchKey> keys;
    for (uint64_t index = 0; index < outer; ++index) {
        uint64_t inner = r.get<uint64_t>();
        if (inner == 0) continue;
        if (inner != digits) throw InputError(std::string(what) + " have a key with the wrong number of components");
        SwitchKey key;
        key.digits = digits;
        key.key_limbs = key_limbs;
        key.n = n;
        key.max_level = int(digits) - 1;
        key.data.resize(digits * 2 * key_limbs * n);
        for (std::size_t j = 0; j < digits; ++j) {
            Meta m = ciphertext_blob(r);
            if (m.pid != ids.key_pid || !m.ntt || m.size != 2 || m.degree != n || m.limbs != key_limbs)
                throw InputError(std::string(what) + " hold a component that does not fit these parameters");
            for (int k = 0; k < 2; ++k)
                for (std::size_t i = 0; i < key_limbs; ++i)
                    copy_checked(const_cast<u64*>(key.part(j, k, i)), m.coeffs + ((k * key_limbs + i) * n) * 8, n,
                                 ctx.primes[i], what);
        }
        keys.emplace(uint32_t(2 * index + 1), std::move(key));
    }
    if (r.pos != size) throw InputError(std::string(what) + " have unexpected trailing bytes");
    return keys;
}

}  // namespace medhe
