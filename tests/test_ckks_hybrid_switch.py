"""The native runtime's hybrid key switch (ModUp, key product, ModDown) on real SEAL ciphertexts (issue 29, step 2).

Three layouts at N=8192 cover the cases: two special primes with digits of two primes, three special primes
(the ModDown overflow correction for u up to 2), and digits of three primes with a short last digit. SEAL
encrypts and decrypts (ciphertexts keep SEAL's layout); every key switch -- rotation, hoisted rotations,
rotate-and-sum, relinearization, conjugation -- must decrypt correctly at every level, with an error no larger than
SEAL's own key switch on the same ciphertext with SEAL-format keys of the same secret (measured side by side and
reported) plus the layout's predicted key-switch noise (6 standard deviations in a slot: a P barely above a digit
costs precision, which is the planner's trade). SEAL's own keys read as hybrid keys (one prime per digit, one special prime) must give the SEAL path's
bytes exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import seal

from medhe.errors import CiphertextError
from medhe.he.ckks.compiler.params import CKKSParams, coeff_modulus
from medhe.he.ckks.hybrid import keys as server_keys
from medhe.he.ckks.hybrid.keygen import HybridKeyGenerator
from medhe.he.ckks.hybrid.layout import HybridLayout

native = pytest.importorskip("medhe.he.ckks.backends.native", reason="native runtime not built")
from medhe.he.ckks import _runtime  # noqa: E402

N = 8192
STEPS = [1, -3, 100, 2047]


def _layout(bits: tuple[int, ...], levels: int, alpha: int) -> HybridLayout:
    primes = coeff_modulus(N, bits)
    return HybridLayout(N, primes[:levels], primes[levels:], alpha).check()


LAYOUTS = {
    "k2-alpha2": _layout((38, 27, 27, 27, 27, 35, 35), 5, 2),
    "k3-alpha2": _layout((40, 30, 30, 30, 28, 28, 28), 4, 2),
    "k2-alpha3": _layout((30, 25, 25, 25, 25, 40, 40), 5, 3),
}


class Session:
    """Client (SEAL + the hybrid key generator) and server (the runtime with hybrid keys) for one layout, plus
    SEAL-format keys of the same secret in the client context for the side-by-side reference."""

    def __init__(self, layout: HybridLayout) -> None:
        self.layout = layout
        self.gen = HybridKeyGenerator(layout)
        self.ctx = server_keys.native_context(layout)
        self.elts = {step: self.ctx.galois_element(step) for step in STEPS + [0]}
        galois = {elt: self.gen.compact_key(self.gen.galois_key(elt)) for elt in self.elts.values()}
        self.sent = sum(len(f) for frames in galois.values() for f in frames)
        self.keys = server_keys.native_keys(self.ctx, layout, galois, self.gen.compact_key(self.gen.relin_key()))
        c = self.gen.context
        self.seal_ctx = c
        self.encoder, self.evaluator = seal.CKKSEncoder(c), seal.Evaluator(c)
        self.encryptor = seal.Encryptor(c, self.gen.secret_key)
        self.decryptor = seal.Decryptor(c, self.gen.secret_key)
        ref = seal.KeyGenerator(c, self.gen.secret_key)
        self.seal_galois = seal.GaloisKeys()
        ref.create_galois_keys(STEPS, self.seal_galois)
        self.seal_relin = ref.create_relin_keys()
        self.pids = []
        data = c.first_context_data()
        while data is not None:
            self.pids.append(data.parms_id())
            data = data.next_context_data()

    def encrypt(self, x: np.ndarray, level: int, scale: float) -> seal.Ciphertext:
        plain = self.encoder.encode(x, scale)
        self.evaluator.mod_switch_to_inplace(plain, self.pids[len(self.pids) - 1 - level])
        return self.encryptor.encrypt_symmetric(plain)

    def decrypt_native(self, ct) -> np.ndarray:
        return self.decrypt(self.seal_ctx.from_cipher_str(self.ctx.save_ciphertext(ct)))

    def decrypt(self, ct: seal.Ciphertext) -> np.ndarray:
        return np.asarray(self.encoder.decode(self.decryptor.decrypt(ct)))


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def session(request) -> Session:
    return Session(LAYOUTS[request.param])


def _scale(level: int) -> float:
    return 2.0 ** 25  # values in [-1, 1] leave 4+ bits under every first prime (no product is taken at level 0)


def test_hybrid_keys_are_smaller_than_seals(session):
    """Keys as sent (seeded, bit-packed digits) against SEAL's format for the same chain, as medhe sends it."""
    from medhe.he.ckks.wire import serialize
    from medhe.he.ckks.wire.seeder import Seeder

    seeder = Seeder(session.seal_ctx, session.gen.secret_key)
    seal_sent = len(serialize.dump_galois_keys(session.seal_galois, session.seal_ctx, seeder))
    hybrid_sent = session.sent * len(STEPS) / len(session.elts)  # the same keys (conjugation excluded)
    print(f"\nkeys as sent for {len(STEPS)} rotations: hybrid {hybrid_sent / 1e6:.2f} MB "
          f"(dnum={session.layout.dnum}, k={len(session.layout.special_primes)}), SEAL {seal_sent / 1e6:.2f} MB")
    assert hybrid_sent < seal_sent


def test_every_key_switch_decrypts_at_every_level_within_seals_noise(session):
    rng = np.random.default_rng(7)
    slots = N // 2
    x = rng.uniform(-1, 1, slots)
    report = []
    for level in range(session.layout.levels - 1, -1, -1):
        scale = _scale(level)
        bound = 6 * np.sqrt(N) * session.layout.switch_noise() / scale
        ct = session.encrypt(x, level, scale)
        nct = session.ctx.load_ciphertext(ct.to_string())
        assert nct.level == level
        for step in STEPS:
            want = np.roll(x, -step)
            ours = np.abs(session.decrypt_native(session.ctx.rotate(nct, step, session.keys)) - want).max()
            ref = np.abs(session.decrypt(session.evaluator.rotate_vector(ct, step, session.seal_galois)) - want).max()
            report.append((level, f"rotate {step}", ours, ref))
            assert ours < ref + bound, (level, step, ours, ref, bound)
        for step, out in zip(STEPS, session.ctx.rotate_hoisted(nct, STEPS, session.keys)):
            err = np.abs(session.decrypt_native(out) - np.roll(x, -step)).max()
            assert err < ref + bound, (level, step, err)
        summed = session.ctx.rotate_sum([nct] * 3, [0, 1, -3], session.keys)
        want = x + np.roll(x, -1) + np.roll(x, 3)
        err = np.abs(session.decrypt_native(summed) - want).max()
        assert err < 3 * ref + bound, (level, err)
        conj = session.ctx.conjugate(nct, session.keys)
        assert np.abs(session.decrypt_native(conj) - x).max() < ref + bound
        if level > 0:  # the product needs a rescale's worth of room above level 0
            sq = session.ctx.relinearize(session.ctx.multiply(nct, nct), session.keys)
            ours = np.abs(session.decrypt_native(sq) - x * x).max()
            seal_sq = session.evaluator.relinearize(session.evaluator.multiply(ct, ct), session.seal_relin)
            ref_mul = np.abs(session.decrypt(seal_sq) - x * x).max()
            report.append((level, "multiply+relin", ours, ref_mul))
            assert ours < 3 * ref_mul + 1e-9, (level, ours, ref_mul)
            ours = np.abs(session.decrypt_native(session.ctx.rescale(sq)) - x * x).max()
            ref_rescaled = np.abs(session.decrypt(session.evaluator.rescale_to_next(seal_sq)) - x * x).max()
            assert ours < 3 * ref_rescaled, (level, ours, ref_rescaled)
    print()
    for level, op, ours, ref in report:
        print(f"level {level} {op:>16}: max error hybrid {ours:.2e}, SEAL keys {ref:.2e}")
    print(f"predicted key-switch noise per coefficient: {session.layout.switch_noise():.1f}")


def test_seal_keys_read_as_hybrid_give_the_seal_paths_bytes():
    """With one prime per digit and one special prime the hybrid steps are SEAL's (centered digits): SEAL's own
    keys through the hybrid path give the hoisted rotations' and rotate-and-sum's bytes exactly."""
    params = CKKSParams(8192, (38, 27, 27, 27, 27, 27, 43), 27)
    nb = native.NativeBackend(params)
    nb.keygen(STEPS, True)
    as_hybrid = nb.ctx.seal_keys_as_hybrid(nb.keys)
    x = np.random.default_rng(3).uniform(-1, 1, N // 2)
    for level in (nb.top, 2, 0):
        ct = nb.encrypt_values(x, level, _scale(level))
        for a, b in zip(nb.ctx.rotate_hoisted(ct, STEPS, nb.keys), nb.ctx.rotate_hoisted(ct, STEPS, as_hybrid)):
            assert np.array_equal(a.to_array(), b.to_array())
        a = nb.ctx.rotate_sum([ct, ct], [1, -3], nb.keys)
        b = nb.ctx.rotate_sum([ct, ct], [1, -3], as_hybrid)
        assert np.array_equal(a.to_array(), b.to_array())
        ours = np.abs(nb.decrypt(nb.ctx.rotate(ct, 1, as_hybrid)) - np.roll(x, -1)).max()
        ref = np.abs(nb.decrypt(nb.ctx.rotate(ct, 1, nb.keys)) - np.roll(x, -1)).max()
        assert ours < 2 * ref


def test_the_server_reads_keys_from_the_public_layout_alone():
    layout = LAYOUTS["k2-alpha2"]
    gen = HybridKeyGenerator(layout)
    ctx = server_keys.native_context(layout)  # no secret anywhere on this side
    elt = ctx.galois_element(5)
    keys = server_keys.native_keys(ctx, layout, {elt: gen.compact_key(gen.galois_key(elt))}, None)
    assert keys.galois_elements == [elt] and not keys.has_relin
    assert keys.nbytes() == layout.key_words() * 8
    assert ctx.special_count == 2 and list(ctx.primes) == list(layout.primes)


def test_bad_hybrid_keys_are_refused_in_one_line():
    layout = LAYOUTS["k2-alpha2"]
    gen = HybridKeyGenerator(layout)
    ctx = server_keys.native_context(layout)
    elt = ctx.galois_element(1)
    frames = gen.compact_key(gen.galois_key(elt))
    with pytest.raises(CiphertextError, match="has 4 digits where this model's chain has 3"):
        server_keys.native_keys(ctx, layout, {elt: frames + frames[:1]}, None)
    # a key of fewer digits serves only the levels they cover
    short = server_keys.native_keys(ctx, layout, {elt: frames[:1]}, None)
    x = np.random.default_rng(1).uniform(-1, 1, N // 2)
    enc, encoder = seal.Encryptor(gen.context, gen.secret_key), seal.CKKSEncoder(gen.context)
    top = ctx.load_ciphertext(enc.encrypt_symmetric(encoder.encode(x, 2.0 ** 25)).to_string())
    with pytest.raises(_runtime.InputError, match="does not cover level"):
        ctx.rotate(top, 1, short)
    garbled = frames[1][:-40] + bytes(40)
    with pytest.raises(CiphertextError, match="checksum"):
        server_keys.native_keys(ctx, layout, {elt: [frames[0], garbled, frames[2]]}, None)
    arr = server_keys.key_residues(frames, layout, "key")
    bad = arr.copy()
    bad[0, 0, 0, 0] = layout.primes[0]
    keys = ctx.hybrid_keys({}, None, layout.alpha)
    with pytest.raises(ValueError, match="outside its prime"):
        ctx.add_hybrid_key(keys, elt, bad, layout.alpha)
    with pytest.raises(ValueError, match="wrong shape"):
        ctx.add_hybrid_key(keys, elt, arr[:, :, :-1], layout.alpha)
    with pytest.raises(ValueError, match="invalid Galois element"):
        ctx.add_hybrid_key(keys, 4, arr, layout.alpha)
    # SEAL-format keys cannot enter a chain with several special primes, nor a rotation run without its key
    with pytest.raises(ValueError, match="hybrid keys"):
        ctx.load_keys(b"\x5e\xa1" + bytes(60), b"")
    one = seal.CKKSEncoder(gen.context).encode(1.0, 2.0 ** 25)
    ct = ctx.load_ciphertext(seal.Encryptor(gen.context, gen.secret_key).encrypt_symmetric(one).to_string())
    with pytest.raises(_runtime.InputError, match="no Galois key"):
        ctx.rotate(ct, 1, keys)
