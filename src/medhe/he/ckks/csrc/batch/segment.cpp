// Slot-batched CKKS: one "segment" of a batch plan (everything between two relinearize/rescale points) evaluated
// coefficient-chunk by coefficient-chunk on SEAL-layout RNS arrays.
//
// In a batch plan every ciphertext holds one tensor element for 4096 images, so a linear layer is a sparse matrix
// of small signed integer weights applied to whole ciphertexts, and an activation u*(+-u + beta) is a dyadic
// product. In NTT form both act on each (limb, coefficient) word independently, so a whole segment runs on a
// chunk of words at a time: the intermediate tensors (thousands of ciphertexts) never exist in full, only as
// a chunk that stays in cache. Results are bit-identical to SEAL's multiply_plain (by a constant), add,
// add_plain and multiply: the same integers modulo the same primes.
//
// Arithmetic: residues < 2^31 (the plan's data primes have at most 31 bits) are kept as uint32 in the chunk
// buffers; a multiply-accumulate adds w * x (int32 x int32 -> int64) lazily and reduces only when the bound on
// |accumulator| says it must (and once per output word), with a floating-point quotient estimate.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEDHE_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define MEDHE_CLONES
#endif

namespace {

constexpr int KIND_MAC = 0;
constexpr int KIND_POLY2 = 1;
constexpr size_t MAX_WORDS = 3 * 256;  // ciphertext size x chunk: the accumulator lives on the stack

struct Value {
    int64_t count;
    int size;  // polynomials per ciphertext
};

struct Step {
    int kind = KIND_MAC;
    int src = 0, dst = 0;
    // mac
    std::vector<int64_t> indptr, indices;
    std::vector<int32_t> weights;
    std::vector<uint64_t> bias;  // (rows, limbs) residues, empty: none
    int64_t wmax = 0;
    // poly2: u * (sign * u + beta) + c
    int sign = 1;
    std::vector<uint64_t> beta, c;  // (limbs,) residues; c empty: none
};

// a mod q in [0, q) for |a| < 2^63 and q < 2^31: the double quotient is off by at most one.
inline int64_t reduce(int64_t a, int64_t q, double qinv) {
    int64_t k = static_cast<int64_t>(static_cast<double>(a) * qinv);
    int64_t r = a - k * q;
    r += r < 0 ? q : 0;
    r += r < 0 ? q : 0;
    r -= r >= q ? q : 0;
    r -= r >= q ? q : 0;
    return r;
}

MEDHE_CLONES void reduce_all(int64_t* acc, size_t len, int64_t q, double qinv) {
    for (size_t j = 0; j < len; ++j) acc[j] = reduce(acc[j], q, qinv);
}

MEDHE_CLONES void accumulate(int64_t* __restrict acc, const uint32_t* __restrict x, int64_t w, size_t len) {
    for (size_t j = 0; j < len; ++j) acc[j] += w * static_cast<int64_t>(static_cast<int32_t>(x[j]));
}

MEDHE_CLONES void finish(const int64_t* __restrict acc, uint32_t* __restrict out, size_t len, int64_t q,
                         double qinv, int64_t bias, size_t bias_len) {
    for (size_t j = 0; j < len; ++j) {
        int64_t v = acc[j] + (j < bias_len ? bias : 0);
        out[j] = static_cast<uint32_t>(reduce(v, q, qinv));
    }
}

// dst[o] = sum_k w_k src[col_k] (+ bias on polynomial 0), rows of `len` words (size x chunk).
void mac_rows(const Step& st, const uint32_t* src, uint32_t* dst, size_t len, size_t chunk, int limb, int limbs,
              int64_t q) {
    const double qinv = 1.0 / static_cast<double>(q);
    // Terms that may be added before |acc| could pass 2^63 (acc starts below q after a reduction).
    const int64_t per = std::max<int64_t>(1, st.wmax) * (q - 1);
    const int64_t block = std::max<int64_t>(1, (INT64_MAX - q) / per);
    alignas(64) int64_t acc[MAX_WORDS];
    const int64_t rows = static_cast<int64_t>(st.indptr.size()) - 1;
    for (int64_t o = 0; o < rows; ++o) {
        std::fill(acc, acc + len, 0);
        int64_t since = 0;
        for (int64_t k = st.indptr[o]; k < st.indptr[o + 1]; ++k) {
            accumulate(acc, src + static_cast<size_t>(st.indices[k]) * len, st.weights[k], len);
            if (++since == block) {
                reduce_all(acc, len, q, qinv);
                since = 1;  // the reduced value counts like one term
            }
        }
        int64_t b = st.bias.empty() ? 0 : static_cast<int64_t>(st.bias[o * limbs + limb]);
        finish(acc, dst + o * len, len, q, qinv, b, st.bias.empty() ? 0 : chunk);
    }
}

MEDHE_CLONES void poly2_rows(const uint32_t* __restrict src, uint32_t* __restrict dst, int64_t count, size_t chunk,
                             int64_t q, int sign, int64_t beta, int64_t c) {
    const double qinv = 1.0 / static_cast<double>(q);
    for (int64_t i = 0; i < count; ++i) {
        const uint32_t* u0 = src + i * 2 * chunk;
        const uint32_t* u1 = u0 + chunk;
        uint32_t* d0 = dst + i * 3 * chunk;
        uint32_t* d1 = d0 + chunk;
        uint32_t* d2 = d1 + chunk;
        for (size_t j = 0; j < chunk; ++j) {
            int64_t a0 = u0[j], a1 = u1[j];
            int64_t v0 = sign > 0 ? a0 : q - a0;  // in (0, q]
            v0 += beta;
            v0 -= v0 >= q ? q : 0;
            v0 -= v0 >= q ? q : 0;
            int64_t v1 = sign > 0 ? a1 : q - a1;
            d0[j] = static_cast<uint32_t>(reduce(reduce(a0 * v0, q, qinv) + c, q, qinv));
            d1[j] = static_cast<uint32_t>(reduce(a0 * v1 + a1 * v0, q, qinv));
            d2[j] = static_cast<uint32_t>(reduce(a1 * v1, q, qinv));
        }
    }
}

class Segment {
   public:
    Segment(std::vector<uint64_t> moduli, int64_t degree, std::vector<std::pair<int64_t, int>> values)
        : moduli_(std::move(moduli)), degree_(degree) {
        if (moduli_.empty()) throw std::invalid_argument("a segment needs at least one prime");
        for (uint64_t q : moduli_)
            if (q < 3 || q >= (1ull << 31)) throw std::invalid_argument("batch kernels need primes below 2^31");
        if (degree_ < 1) throw std::invalid_argument("bad ring degree");
        for (auto& v : values) {
            if (v.first < 1 || v.second < 1 || v.second > 3) throw std::invalid_argument("bad value shape");
            values_.push_back({v.first, v.second});
        }
        if (values_.empty()) throw std::invalid_argument("a segment needs an input value");
    }

    void add_mac(int src, int dst, py::array_t<int64_t, py::array::c_style | py::array::forcecast> indptr,
                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> indices,
                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> weights,
                 py::array_t<uint64_t, py::array::c_style | py::array::forcecast> bias) {
        check_value(src);
        check_value(dst);
        if (values_[src].size != values_[dst].size) throw std::invalid_argument("mac keeps the ciphertext size");
        Step st;
        st.kind = KIND_MAC;
        st.src = src;
        st.dst = dst;
        st.indptr.assign(indptr.data(), indptr.data() + indptr.size());
        st.indices.assign(indices.data(), indices.data() + indices.size());
        if (static_cast<int64_t>(st.indptr.size()) != values_[dst].count + 1)
            throw std::invalid_argument("mac: indptr length must be rows + 1");
        if (weights.size() != indices.size()) throw std::invalid_argument("mac: one weight per index");
        if (st.indptr.front() != 0 || st.indptr.back() != static_cast<int64_t>(st.indices.size()))
            throw std::invalid_argument("mac: indptr does not span the indices");
        for (size_t i = 1; i < st.indptr.size(); ++i)
            if (st.indptr[i] < st.indptr[i - 1]) throw std::invalid_argument("mac: indptr decreases");
        for (int64_t k : st.indices)
            if (k < 0 || k >= values_[src].count) throw std::invalid_argument("mac: index out of range");
        for (ssize_t k = 0; k < weights.size(); ++k) {
            int64_t w = weights.data()[k];
            if (w <= INT32_MIN || w > INT32_MAX) throw std::invalid_argument("mac: weights must fit 31 bits");
            st.weights.push_back(static_cast<int32_t>(w));
            st.wmax = std::max<int64_t>(st.wmax, w < 0 ? -w : w);
        }
        if (bias.size()) {
            if (bias.size() != values_[dst].count * static_cast<int64_t>(moduli_.size()))
                throw std::invalid_argument("mac: bias must be (rows, limbs)");
            st.bias.assign(bias.data(), bias.data() + bias.size());
            check_residues(st.bias);
        }
        steps_.push_back(std::move(st));
    }

    void add_poly2(int src, int dst, int sign, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> beta,
                   py::array_t<uint64_t, py::array::c_style | py::array::forcecast> c) {
        check_value(src);
        check_value(dst);
        if (values_[src].size != 2 || values_[dst].size != 3 || values_[src].count != values_[dst].count)
            throw std::invalid_argument("poly2 maps size-2 ciphertexts to as many size-3 ones");
        Step st;
        st.kind = KIND_POLY2;
        st.src = src;
        st.dst = dst;
        st.sign = sign < 0 ? -1 : 1;
        st.beta.assign(beta.data(), beta.data() + beta.size());
        if (st.beta.size() != moduli_.size()) throw std::invalid_argument("poly2: beta must have one residue per limb");
        check_residues(st.beta);
        if (c.size()) {
            st.c.assign(c.data(), c.data() + c.size());
            if (st.c.size() != moduli_.size()) throw std::invalid_argument("poly2: c must have one residue per limb");
            check_residues(st.c);
        }
        steps_.push_back(std::move(st));
    }

    // Input residues as uint64 (SEAL's layout) or uint32 (half the memory: every prime is below 2^31).
    py::array_t<uint64_t> run(py::array input, int output, int threads, int64_t chunk) {
        if (py::isinstance<py::array_t<uint32_t>>(input)) {
            auto a = py::array_t<uint32_t, py::array::c_style | py::array::forcecast>::ensure(input);
            return run_typed<uint32_t>(a, output, threads, chunk);
        }
        auto a = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(input);
        if (!a) throw std::invalid_argument("input must be an array of residues");
        return run_typed<uint64_t>(a, output, threads, chunk);
    }

    template <typename T>
    py::array_t<uint64_t> run_typed(const py::array_t<T, py::array::c_style | py::array::forcecast>& input,
                                    int output, int threads, int64_t chunk) {
        check_value(output);
        const int64_t limbs = static_cast<int64_t>(moduli_.size());
        const Value in = values_[0], out = values_[output];
        if (input.ndim() != 4 || input.shape(0) != in.count || input.shape(1) != in.size || input.shape(2) != limbs ||
            input.shape(3) != degree_)
            throw std::invalid_argument("input must be (" + std::to_string(in.count) + ", " + std::to_string(in.size) +
                                        ", " + std::to_string(limbs) + ", " + std::to_string(degree_) +
                                        ") residues");
        if (chunk < 1 || degree_ % chunk || chunk * 3 > static_cast<int64_t>(MAX_WORDS))
            throw std::invalid_argument("chunk must divide the ring degree and be at most 256");
        py::array_t<uint64_t> result({static_cast<py::ssize_t>(out.count), static_cast<py::ssize_t>(out.size),
                                      static_cast<py::ssize_t>(limbs), static_cast<py::ssize_t>(degree_)});
        const T* src = input.data();
        uint64_t* dst = result.mutable_data();
        const int64_t tasks = limbs * (degree_ / chunk);
        threads = std::max(1, std::min<int>(threads, static_cast<int>(tasks)));
        std::atomic<int64_t> next{0};
        std::atomic<bool> bad{false};
        auto worker = [&]() {
            std::vector<std::vector<uint32_t>> bufs(values_.size());
            for (size_t v = 0; v < values_.size(); ++v) bufs[v].resize(values_[v].count * values_[v].size * chunk);
            for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
                const int limb = static_cast<int>(t / (degree_ / chunk));
                const int64_t off = (t % (degree_ / chunk)) * chunk;
                const uint64_t q = moduli_[limb];
                // gather the input chunk
                uint32_t* b0 = bufs[0].data();
                for (int64_t i = 0; i < in.count; ++i)
                    for (int p = 0; p < in.size; ++p) {
                        const T* s = src + (((i * in.size + p) * limbs + limb) * degree_ + off);
                        uint32_t* d = b0 + (i * in.size + p) * chunk;
                        for (int64_t j = 0; j < chunk; ++j) {
                            if (s[j] >= q) bad.store(true);
                            d[j] = static_cast<uint32_t>(s[j]);
                        }
                    }
                if (bad.load()) return;
                for (const Step& st : steps_) {
                    if (st.kind == KIND_MAC) {
                        mac_rows(st, bufs[st.src].data(), bufs[st.dst].data(), values_[st.src].size * chunk, chunk,
                                 limb, static_cast<int>(limbs), static_cast<int64_t>(q));
                    } else {
                        poly2_rows(bufs[st.src].data(), bufs[st.dst].data(), values_[st.src].count, chunk,
                                   static_cast<int64_t>(q), st.sign, static_cast<int64_t>(st.beta[limb]),
                                   st.c.empty() ? 0 : static_cast<int64_t>(st.c[limb]));
                    }
                }
                const uint32_t* r = bufs[output].data();
                for (int64_t i = 0; i < out.count; ++i)
                    for (int p = 0; p < out.size; ++p) {
                        uint64_t* d = dst + (((i * out.size + p) * limbs + limb) * degree_ + off);
                        const uint32_t* s = r + (i * out.size + p) * chunk;
                        for (int64_t j = 0; j < chunk; ++j) d[j] = s[j];
                    }
            }
        };
        {
            py::gil_scoped_release release;
            std::vector<std::thread> pool;
            for (int k = 1; k < threads; ++k) pool.emplace_back(worker);
            worker();
            for (auto& th : pool) th.join();
        }
        if (bad.load()) throw std::invalid_argument("input residues are not reduced modulo their primes");
        return result;
    }

    size_t step_count() const { return steps_.size(); }

   private:
    void check_value(int v) const {
        if (v < 0 || v >= static_cast<int>(values_.size())) throw std::invalid_argument("value index out of range");
    }
    void check_residues(const std::vector<uint64_t>& r) const {
        const size_t limbs = moduli_.size();
        for (size_t k = 0; k < r.size(); ++k)
            if (r[k] >= moduli_[k % limbs]) throw std::invalid_argument("constant residue is not reduced");
    }

    std::vector<uint64_t> moduli_;
    int64_t degree_;
    std::vector<Value> values_;
    std::vector<Step> steps_;
};

}  // namespace

PYBIND11_MODULE(_batch, m) {
    m.doc() = "medhe's slot-batched CKKS kernels: multiply-accumulate and squaring segments on RNS arrays";
    py::class_<Segment>(m, "Segment")
        .def(py::init<std::vector<uint64_t>, int64_t, std::vector<std::pair<int64_t, int>>>(), py::arg("moduli"),
             py::arg("degree"), py::arg("values"))
        .def("add_mac", &Segment::add_mac, py::arg("src"), py::arg("dst"), py::arg("indptr"), py::arg("indices"),
             py::arg("weights"), py::arg("bias"))
        .def("add_poly2", &Segment::add_poly2, py::arg("src"), py::arg("dst"), py::arg("sign"), py::arg("beta"),
             py::arg("c"))
        .def("run", &Segment::run, py::arg("input"), py::arg("output"), py::arg("threads") = 2,
             py::arg("chunk") = 64)
        .def_property_readonly("steps", &Segment::step_count);
}
