// Python bindings (pybind11): module medhe.he.ckks._runtime.
//
// Heavy calls release the GIL. Errors in caller data raise _runtime.InputError (a ValueError), which the Python
// wrapper turns into medhe.errors.CiphertextError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "runtime.h"

namespace py = pybind11;
using namespace medhe;

namespace {

struct NativeContext {
    std::shared_ptr<Context> ctx;
    SealIds ids;
};

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

std::pair<const char*, std::size_t> bytes_view(const py::bytes& b) {
    char* p = nullptr;
    Py_ssize_t n = 0;
    if (PyBytes_AsStringAndSize(b.ptr(), &p, &n) != 0) throw py::error_already_set();
    return {p, std::size_t(n)};
}

Plaintext plaintext_from(const NativeContext& c, U64Array arr, int level, double scale) {
    const Context& ctx = *c.ctx;
    if (level < 0 || level > ctx.top_level()) throw InputError("plaintext level out of range");
    if (arr.ndim() != 2 || std::size_t(arr.shape(0)) != std::size_t(level) + 1 || std::size_t(arr.shape(1)) != ctx.n)
        throw InputError("plaintext array must have shape (level + 1, n)");
    Plaintext p;
    p.level = level;
    p.scale = scale;
    p.n = ctx.n;
    p.data.resize(std::size_t(level + 1) * ctx.n);
    const uint64_t* src = arr.data();
    for (int i = 0; i <= level; ++i)
        for (std::size_t j = 0; j < ctx.n; ++j) {
            uint64_t v = src[std::size_t(i) * ctx.n + j];
            if (v >= ctx.primes[std::size_t(i)]) throw InputError("plaintext holds a coefficient outside its prime");
            p.data.data()[std::size_t(i) * ctx.n + j] = v;
        }
    return p;
}

Ciphertext ciphertext_from(const NativeContext& c, U64Array arr, int level, double scale) {
    const Context& ctx = *c.ctx;
    if (level < 0 || level > ctx.top_level()) throw InputError("ciphertext level out of range");
    if (arr.ndim() != 3 || arr.shape(0) < 2 || arr.shape(0) > 3 || std::size_t(arr.shape(1)) != std::size_t(level) + 1 ||
        std::size_t(arr.shape(2)) != ctx.n)
        throw InputError("ciphertext array must have shape (2 or 3, level + 1, n)");
    Ciphertext ct;
    ct.allocate(int(arr.shape(0)), level, ctx.n);
    ct.scale = scale;
    const uint64_t* src = arr.data();
    for (int k = 0; k < ct.size; ++k)
        for (int i = 0; i <= level; ++i)
            for (std::size_t j = 0; j < ctx.n; ++j) {
                uint64_t v = src[(std::size_t(k) * (level + 1) + i) * ctx.n + j];
                if (v >= ctx.primes[std::size_t(i)]) throw InputError("ciphertext holds a coefficient outside its prime");
                ct.limb(k, i)[j] = v;
            }
    return ct;
}

// A hybrid key from a (digits, 2, L + k, n) array of residues (NTT form), each checked against its prime. A key
// used only up to some level may carry just the first digits (those that level reads): it then serves up to
// min(max_level, digits * alpha - 1).
SwitchKey hybrid_key_from(const NativeContext& c, U64Array arr, std::size_t alpha, int max_level = -1) {
    const Context& ctx = *c.ctx;
    const std::size_t limbs = ctx.primes.size(), n = ctx.n;
    if (alpha == 0 || alpha > ctx.data_count) throw InputError("hybrid keys need 1 to L data primes per digit");
    const std::size_t full = (ctx.data_count + alpha - 1) / alpha;
    const std::size_t digits = arr.ndim() == 4 ? std::size_t(arr.shape(0)) : 0;
    if (arr.ndim() != 4 || digits < 1 || digits > full || arr.shape(1) != 2 ||
        std::size_t(arr.shape(2)) != limbs || std::size_t(arr.shape(3)) != n)
        throw InputError("hybrid key has the wrong shape: expected (1 to " + std::to_string(full) + ", 2, " +
                         std::to_string(limbs) + ", " + std::to_string(n) + ")");
    SwitchKey key;
    key.digits = digits;
    key.key_limbs = limbs;
    key.n = n;
    key.alpha = alpha;
    key.max_level = int(std::min(ctx.data_count, digits * alpha)) - 1;
    if (max_level >= 0) key.max_level = std::min(key.max_level, max_level);
    key.data.resize(digits * 2 * limbs * n);
    const uint64_t* src = arr.data();
    u64* dst = key.data.data();
    u64 bad = 0;
    for (std::size_t row = 0; row < digits * 2 * limbs; ++row) {
        const u64 q = ctx.primes[row % limbs];
        for (std::size_t j = 0; j < n; ++j) {
            const u64 v = src[row * n + j];
            bad |= (v >= q);
            dst[row * n + j] = v;
        }
    }
    if (bad) throw InputError("hybrid key holds a coefficient outside its prime: it is corrupted");
    return key;
}

py::array_t<uint64_t> to_array(const Ciphertext& ct) {
    py::array_t<uint64_t> out({py::ssize_t(ct.size), py::ssize_t(ct.limbs()), py::ssize_t(ct.n)});
    std::memcpy(out.mutable_data(), ct.data.data(), ct.data.size() * 8);
    return out;
}

// Each limb of a (..., limbs, n) array is transformed modulo prime `first + limb`.
void transform_rows(const NativeContext& c, py::array_t<uint64_t, py::array::c_style>& arr, int first, bool forward) {
    const Context& ctx = *c.ctx;
    if (arr.ndim() < 2 || std::size_t(arr.shape(arr.ndim() - 1)) != ctx.n) throw InputError("array must end in n");
    std::size_t limbs = std::size_t(arr.shape(arr.ndim() - 2));
    if (first < 0 || std::size_t(first) + limbs > ctx.primes.size()) throw InputError("too many limbs for the chain");
    std::size_t rows = std::size_t(arr.size()) / ctx.n;
    uint64_t* data = arr.mutable_data();
    for (std::size_t r = 0; r < rows; ++r) {
        const NTTTables& t = ctx.tables[std::size_t(first) + r % limbs];
        uint64_t* row = data + r * ctx.n;
        for (std::size_t j = 0; j < ctx.n; ++j)
            if (row[j] >= t.mod.q) throw InputError("array holds a value outside its prime");
    }
    py::gil_scoped_release release;
    parallel_for(rows, [&](std::size_t r) {
        const NTTTables& t = ctx.tables[std::size_t(first) + r % limbs];
        if (forward) ntt_forward(data + r * ctx.n, t);
        else ntt_inverse(data + r * ctx.n, t);
    });
}

}  // namespace

PYBIND11_MODULE(_runtime, m) {
    m.doc() = "medhe's native CKKS runtime (SEAL-compatible RNS arithmetic, key switching, whole-program runs)";
    py::register_exception<InputError>(m, "InputError", PyExc_ValueError);

    m.def("ifma_available", &ifma_available, "whether this CPU has AVX-512 IFMA");
    m.def("isa", &isa_name, "the kernel set in use: avx512ifma or portable");
    m.def("set_isa", &set_isa, py::arg("name"), "auto | portable | ifma (MEDHE_NATIVE_ISA sets the start value)");
    m.def("set_threads", &set_threads, py::arg("count"));
    m.def("threads", &threads);
    m.def("pool_selftest", &pool_selftest, py::arg("jobs"), py::arg("max_count"),
          py::call_guard<py::gil_scoped_release>(),
          "Run back-to-back parallel jobs of changing sizes; returns how many indices ran a wrong number of times.");

    py::class_<Ciphertext>(m, "Ciphertext")
        .def_property_readonly("level", [](const Ciphertext& c) { return c.level; })
        .def_property_readonly("scale", [](const Ciphertext& c) { return c.scale; })
        .def_property_readonly("size", [](const Ciphertext& c) { return c.size; })
        .def("to_array", &to_array, "a (size, level + 1, n) uint64 copy of the residues (NTT form)")
        .def("copy", [](const Ciphertext& c) { return Ciphertext(c); });
    py::class_<Plaintext, std::shared_ptr<Plaintext>>(m, "Plaintext")
        .def_property_readonly("level", [](const Plaintext& p) { return p.level; })
        .def_property_readonly("scale", [](const Plaintext& p) { return p.scale; });
    py::class_<KeySet, std::shared_ptr<KeySet>>(m, "Keys")
        .def_property_readonly("galois_elements", [](const KeySet& k) {
            std::vector<uint32_t> out;
            for (const auto& kv : k.galois) out.push_back(kv.first);
            return out;
        })
        .def_property_readonly("has_relin", &KeySet::has_relin)
        .def("nbytes", [](const KeySet& k) {
            std::size_t b = k.relin ? k.relin->data.size() * 8 : 0;
            for (const auto& kv : k.galois) b += kv.second.data.size() * 8;
            return b;
        });

    py::class_<NativeContext>(m, "Context")
        .def(py::init([](const std::vector<u64>& primes, int log_n, const std::vector<py::bytes>& level_pids,
                         const py::bytes& key_pid, int major, int minor, std::size_t special_count) {
                 auto c = std::make_unique<NativeContext>();
                 c->ctx = std::make_shared<Context>(primes, log_n, special_count);
                 for (const auto& b : level_pids) c->ids.level_pids.push_back(std::string(b));
                 c->ids.key_pid = std::string(key_pid);
                 c->ids.major = uint8_t(major);
                 c->ids.minor = uint8_t(minor);
                 if (c->ids.level_pids.size() != c->ctx->data_count) throw InputError("one parms_id per data level");
                 return c;
             }),
             py::arg("primes"), py::arg("log_n"), py::arg("level_pids"), py::arg("key_pid"), py::arg("major") = 4,
             py::arg("minor") = 0, py::arg("special_count") = 1,
             "primes: the data primes then special_count special primes (SEAL's format: 1)")
        .def_property_readonly("special_count", [](const NativeContext& c) { return c.ctx->special_count; })
        .def_property_readonly("n", [](const NativeContext& c) { return c.ctx->n; })
        .def_property_readonly("primes", [](const NativeContext& c) { return c.ctx->primes; })
        .def("galois_element", [](const NativeContext& c, long step) { return galois_elt_from_step(*c.ctx, step); })
        // ---- SEAL bytes
        .def("load_ciphertext", [](const NativeContext& c, const py::bytes& b) {
            auto v = bytes_view(b);
            py::gil_scoped_release release;
            return load_seal_ciphertext(*c.ctx, c.ids, v.first, v.second);
        })
        .def("save_ciphertext", [](const NativeContext& c, const Ciphertext& ct) {
            std::string s;
            {
                py::gil_scoped_release release;
                s = save_seal_ciphertext(*c.ctx, c.ids, ct);
            }
            return py::bytes(s);
        })
        .def("load_keys", [](const NativeContext& c, const py::bytes& galois, const py::bytes& relin) {
            auto g = bytes_view(galois);
            auto r = bytes_view(relin);
            auto keys = std::make_shared<KeySet>();
            py::gil_scoped_release release;
            if (g.second) keys->galois = load_seal_kswitch(*c.ctx, c.ids, g.first, g.second, "Galois keys");
            if (r.second) {
                auto rk = load_seal_kswitch(*c.ctx, c.ids, r.first, r.second, "relinearization keys");
                auto it = rk.find(1);  // index 0
                if (it == rk.end()) throw InputError("relinearization keys lack the key for s^2");
                keys->relin = std::make_shared<SwitchKey>(std::move(it->second));
            }
            return keys;
        }, py::arg("galois"), py::arg("relin"))
        .def("hybrid_keys", [](const NativeContext& c, const std::map<uint32_t, U64Array>& galois,
                               py::object relin, std::size_t alpha) {
            auto keys = std::make_shared<KeySet>();
            for (const auto& kv : galois) {
                if (!(kv.first & 1) || kv.first >= 2 * c.ctx->n) throw InputError("invalid Galois element");
                keys->galois.emplace(kv.first, hybrid_key_from(c, kv.second, alpha));
            }
            if (!relin.is_none())
                keys->relin = std::make_shared<SwitchKey>(hybrid_key_from(c, relin.cast<U64Array>(), alpha));
            return keys;
        }, py::arg("galois"), py::arg("relin"), py::arg("alpha"),
           "hybrid evaluation keys: Galois element -> (digits, 2, L + k, n) residues, relin the same or None")
        .def("add_hybrid_key", [](const NativeContext& c, KeySet& keys, uint32_t element, U64Array arr,
                                  std::size_t alpha, int max_level) {
            SwitchKey key = hybrid_key_from(c, arr, alpha, max_level);
            for (const auto& kv : keys.galois)
                if (kv.second.alpha != alpha) throw InputError("keys of mixed formats");
            if (keys.relin && keys.relin->alpha != alpha) throw InputError("keys of mixed formats");
            if (element == 0) {
                keys.relin = std::make_shared<SwitchKey>(std::move(key));
            } else {
                if (!(element & 1) || element >= 2 * c.ctx->n) throw InputError("invalid Galois element");
                keys.galois[element] = std::move(key);
            }
        }, py::arg("keys"), py::arg("element"), py::arg("residues"), py::arg("alpha"), py::arg("max_level") = -1,
           "add one hybrid key to a key set, one at a time (element 0: the relinearization key); a key of fewer "
           "digits serves the levels they cover")
        .def("seal_keys_as_hybrid", [](const NativeContext& c, const KeySet& k) {
            // SEAL's keys are hybrid keys with one prime per digit and one special prime (tests: same bytes)
            if (c.ctx->special_count != 1) throw InputError("SEAL's keys have one special prime");
            auto out = std::make_shared<KeySet>(k);
            for (auto& kv : out->galois) kv.second.alpha = 1;
            if (out->relin) {
                out->relin = std::make_shared<SwitchKey>(*k.relin);
                out->relin->alpha = 1;
            }
            return out;
        })
        // ---- arrays
        .def("plaintext", [](const NativeContext& c, U64Array a, int level, double scale) {
            return std::make_shared<Plaintext>(plaintext_from(c, a, level, scale));
        }, py::arg("residues"), py::arg("level"), py::arg("scale"))
        .def("ciphertext", &ciphertext_from, py::arg("residues"), py::arg("level"), py::arg("scale"))
        .def("ntt_forward", [](const NativeContext& c, py::array_t<uint64_t, py::array::c_style> a, int first) {
            transform_rows(c, a, first, true);
        }, py::arg("residues"), py::arg("first_prime") = 0, "in place; limb i modulo prime first_prime + i")
        .def("ntt_inverse", [](const NativeContext& c, py::array_t<uint64_t, py::array::c_style> a, int first) {
            transform_rows(c, a, first, false);
        }, py::arg("residues"), py::arg("first_prime") = 0)
        // ---- operations (SEAL semantics; deterministic ones bit-exact)
        .def("add", [](const NativeContext& c, const Ciphertext& a, const Ciphertext& b) { return add(*c.ctx, a, b); })
        .def("add_inplace", [](const NativeContext& c, Ciphertext& a, const Ciphertext& b) { add_inplace(*c.ctx, a, b); })
        .def("sub", [](const NativeContext& c, const Ciphertext& a, const Ciphertext& b) { return sub(*c.ctx, a, b); })
        .def("negate", [](const NativeContext& c, const Ciphertext& a) { return negate(*c.ctx, a); })
        .def("add_plain", [](const NativeContext& c, const Ciphertext& a, const Plaintext& p) { return add_plain(*c.ctx, a, p); })
        .def("multiply_plain", [](const NativeContext& c, const Ciphertext& a, const Plaintext& p) {
            py::gil_scoped_release release;
            return multiply_plain(*c.ctx, a, p);
        })
        .def("multiply", [](const NativeContext& c, const Ciphertext& a, const Ciphertext& b) {
            py::gil_scoped_release release;
            return multiply(*c.ctx, a, b);
        })
        .def("rescale", [](const NativeContext& c, const Ciphertext& a) {
            py::gil_scoped_release release;
            return rescale(*c.ctx, a);
        })
        .def("mod_switch", [](const NativeContext& c, const Ciphertext& a, int level) { return mod_switch(*c.ctx, a, level); })
        .def("relinearize", [](const NativeContext& c, const Ciphertext& a, const KeySet& k) {
            py::gil_scoped_release release;
            return relinearize(*c.ctx, a, k);
        })
        .def("rotate", [](const NativeContext& c, const Ciphertext& a, long step, const KeySet& k) {
            py::gil_scoped_release release;
            return rotate_galois(*c.ctx, a, galois_elt_from_step(*c.ctx, step), k);
        })
        .def("conjugate", [](const NativeContext& c, const Ciphertext& a, const KeySet& k) {
            py::gil_scoped_release release;
            return rotate_galois(*c.ctx, a, uint32_t(2 * c.ctx->n - 1), k);
        })
        .def("rotate_hoisted", [](const NativeContext& c, const Ciphertext& a, const std::vector<long>& steps, const KeySet& k) {
            std::vector<uint32_t> elts;
            for (long s : steps) elts.push_back(galois_elt_from_step(*c.ctx, s));
            py::gil_scoped_release release;
            return rotate_hoisted(*c.ctx, a, elts, k);
        }, "rotations by many steps from one decomposition (decrypts like SEAL's, not byte-identical)")
        .def("rotate_sum", [](const NativeContext& c, const std::vector<const Ciphertext*>& cts, const std::vector<long>& steps,
                              const KeySet& k) {
            std::vector<uint32_t> elts;
            for (long s : steps) elts.push_back(s == 0 ? 1u : galois_elt_from_step(*c.ctx, s));
            py::gil_scoped_release release;
            return rotate_sum(*c.ctx, cts, elts, k);
        }, "sum of rotations (step 0 = unrotated here) with one shared mod-down")
        .def("program", [](const NativeContext& c, const std::vector<py::tuple>& ops,
                           const std::vector<std::shared_ptr<Plaintext>>& plains, int registers, int inputs, int output) {
            std::vector<Op> list;
            for (const auto& t : ops) {
                if (t.size() != 10) throw InputError("program: each op is a 10-tuple");
                Op op;
                op.code = t[0].cast<int>();
                op.dst = t[1].cast<int>();
                op.a = t[2].cast<int>();
                op.b = t[3].cast<int>();
                op.arg = t[4].cast<long>();
                op.srcs = t[5].cast<std::vector<int>>();
                op.dsts = t[6].cast<std::vector<int>>();
                op.plains = t[7].cast<std::vector<int>>();
                op.elts = t[8].cast<std::vector<uint32_t>>();
                op.frees = t[9].cast<std::vector<int>>();
                list.push_back(std::move(op));
            }
            return Program(c.ctx, std::move(list), plains, registers, inputs, output);
        });

    py::class_<Program>(m, "Program")
        .def("run", [](const Program& p, std::vector<Ciphertext> inputs, const KeySet& keys) {
            py::gil_scoped_release release;
            return p.run(std::move(inputs), keys);
        }, py::arg("inputs"), py::arg("keys"), "the whole plan on one image's ciphertexts, GIL released")
        .def_property_readonly("plain_bytes", &Program::plain_bytes)
        .def_property_readonly("inputs", &Program::inputs);
}
