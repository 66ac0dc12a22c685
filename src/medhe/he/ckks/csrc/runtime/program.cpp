// Executes a lowered plan: one call per image, no Python between operations (the bindings release the GIL).
#include "runtime.h"

namespace medhe {

Program::Program(std::shared_ptr<const Context> ctx, std::vector<Op> ops,
                 std::vector<std::shared_ptr<Plaintext>> plains, int registers, int inputs, int output)
    : ctx_(std::move(ctx)), ops_(std::move(ops)), plains_(std::move(plains)), registers_(registers), inputs_(inputs),
      output_(output) {
    auto reg_ok = [&](int r) { return r >= 0 && r < registers_; };
    auto plain_ok = [&](long p) { return p >= 0 && std::size_t(p) < plains_.size() && plains_[std::size_t(p)]; };
    if (!reg_ok(output_) || inputs_ < 0 || inputs_ > registers_) throw InputError("program: bad register counts");
    for (const Op& op : ops_) {
        bool ok = true;
        switch (op.code) {
            case OP_ADD: case OP_MUL: ok = reg_ok(op.a) && reg_ok(op.b) && reg_ok(op.dst); break;
            case OP_ADD_INPLACE: ok = reg_ok(op.a) && reg_ok(op.b) && op.dst == op.a; break;
            case OP_NEGATE: case OP_RELIN: case OP_RESCALE: case OP_MOD_SWITCH: case OP_ROTATE: case OP_COPY:
                ok = reg_ok(op.a) && reg_ok(op.dst); break;
            case OP_ADD_PLAIN: case OP_MUL_PLAIN: ok = reg_ok(op.a) && reg_ok(op.dst) && plain_ok(op.arg); break;
            case OP_ROTATE_MANY:
                ok = reg_ok(op.a) && op.dsts.size() == op.elts.size() && !op.elts.empty();
                for (int d : op.dsts) ok = ok && reg_ok(d);
                break;
            case OP_ROTATE_SUM:
                ok = reg_ok(op.dst) && op.srcs.size() == op.elts.size() && !op.srcs.empty();
                for (int s : op.srcs) ok = ok && reg_ok(s);
                break;
            case OP_MUL_PLAIN_SUM:
                ok = reg_ok(op.dst) && op.srcs.size() == op.plains.size() && !op.srcs.empty();
                for (std::size_t g = 0; g < op.srcs.size(); ++g) ok = ok && reg_ok(op.srcs[g]) && plain_ok(op.plains[g]);
                break;
            default: ok = false;
        }
        for (int f : op.frees) ok = ok && reg_ok(f);
        if (!ok) throw InputError("program: malformed op " + std::to_string(op.code));
    }
}

std::size_t Program::plain_bytes() const {
    std::size_t total = 0;
    for (const auto& p : plains_) if (p) total += p->data.size() * 8;
    return total;
}

Ciphertext Program::run(std::vector<Ciphertext> inputs, const KeySet& keys) const {
    if (int(inputs.size()) != inputs_) throw InputError("program: wrong number of input ciphertexts");
    const Context& ctx = *ctx_;
    std::vector<Ciphertext> regs(static_cast<std::size_t>(registers_));
    std::vector<bool> live(static_cast<std::size_t>(registers_), false);
    for (int i = 0; i < inputs_; ++i) {
        regs[std::size_t(i)] = std::move(inputs[std::size_t(i)]);
        live[std::size_t(i)] = true;
    }
    auto get = [&](int r) -> const Ciphertext& {
        if (!live[std::size_t(r)]) throw InputError("program: register read before it is written");
        return regs[std::size_t(r)];
    };
    auto set = [&](int r, Ciphertext&& c) {
        regs[std::size_t(r)] = std::move(c);
        live[std::size_t(r)] = true;
    };
    for (const Op& op : ops_) {
        switch (op.code) {
            case OP_ADD: set(op.dst, add(ctx, get(op.a), get(op.b))); break;
            case OP_ADD_INPLACE: get(op.a); add_inplace(ctx, regs[std::size_t(op.a)], get(op.b)); break;
            case OP_NEGATE: set(op.dst, negate(ctx, get(op.a))); break;
            case OP_ADD_PLAIN: set(op.dst, add_plain(ctx, get(op.a), *plains_[std::size_t(op.arg)])); break;
            case OP_MUL_PLAIN: set(op.dst, multiply_plain(ctx, get(op.a), *plains_[std::size_t(op.arg)])); break;
            case OP_MUL: set(op.dst, multiply(ctx, get(op.a), get(op.b))); break;
            case OP_RELIN: set(op.dst, relinearize(ctx, get(op.a), keys)); break;
            case OP_RESCALE: set(op.dst, rescale(ctx, get(op.a))); break;
            case OP_MOD_SWITCH: set(op.dst, mod_switch(ctx, get(op.a), int(op.arg))); break;
            case OP_ROTATE: set(op.dst, rotate_galois(ctx, get(op.a), uint32_t(op.arg), keys)); break;
            case OP_COPY: { Ciphertext c = get(op.a); set(op.dst, std::move(c)); break; }
            case OP_ROTATE_MANY: {
                auto outs = rotate_hoisted(ctx, get(op.a), op.elts, keys);
                for (std::size_t g = 0; g < outs.size(); ++g) set(op.dsts[g], std::move(outs[g]));
                break;
            }
            case OP_ROTATE_SUM: {
                std::vector<const Ciphertext*> cts;
                for (int s : op.srcs) cts.push_back(&get(s));
                set(op.dst, rotate_sum(ctx, cts, op.elts, keys));
                break;
            }
            case OP_MUL_PLAIN_SUM: {
                Ciphertext acc;
                for (std::size_t g = 0; g < op.srcs.size(); ++g)
                    multiply_plain_acc(ctx, acc, get(op.srcs[g]), *plains_[std::size_t(op.plains[g])], g == 0);
                set(op.dst, std::move(acc));
                break;
            }
        }
        for (int f : op.frees) {
            regs[std::size_t(f)] = Ciphertext();
            live[std::size_t(f)] = false;
        }
    }
    get(output_);
    return std::move(regs[std::size_t(output_)]);
}

}  // namespace medhe
