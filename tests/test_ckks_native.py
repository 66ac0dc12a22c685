"""medhe's native CKKS runtime against seal-python: bit-exact operations, hoisted rotations, whole plans, bad input.

Everything runs on real SEAL keys and ciphertexts of a real medhe chain (N=8192, [38, 27 x 5, 43]). Deterministic
operations must give residues identical to seal-python's at every level and on both kernel sets (portable and
AVX-512 IFMA); hoisted rotations are checked by decryption; malformed bytes must raise CiphertextError.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from medhe.errors import CiphertextError

native = pytest.importorskip("medhe.he.ckks.backends.native", reason="native runtime not built")
from medhe.he.ckks import _runtime  # noqa: E402
from medhe.he.ckks.compiler.params import CKKSParams  # noqa: E402

PARAMS = CKKSParams(8192, (38, 27, 27, 27, 27, 27, 43), 27)
STEPS = [1, -1, 3, -17, 64, 1000]
ISAS = ["portable"] + (["ifma"] if _runtime.ifma_available() else [])


@pytest.fixture(scope="module")
def nb():
    be = native.NativeBackend(PARAMS)
    be.keygen(STEPS + [0], True)
    return be


@pytest.fixture(params=ISAS)
def isa(request):
    _runtime.set_isa(request.param)
    yield request.param
    _runtime.set_isa("auto")


def _same(nb, ours, seal_ct) -> bool:
    return np.array_equal(ours.to_array(), nb.from_seal(seal_ct).to_array())


def _scale(level: int) -> float:
    return 2.0 ** (27 if level else 15)  # products must fit SEAL's scale bound at level 0 (38 bits)


@pytest.fixture(params=[1, 2])
def threads(request):
    _runtime.set_threads(request.param)
    yield request.param
    _runtime.set_threads(1)


def test_thread_pool_runs_every_index_of_back_to_back_jobs_exactly_once():
    """The pool's contract under the pattern of a real evaluation: thousands of jobs of changing sizes back to back,
    while another process competes for the cores (a worker scheduled late must never run into the next job: that
    once ran an index twice and hung a Ray actor's evaluation)."""
    import subprocess
    import sys

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 20\nwhile time.time() < t: pass"])
    try:
        for count in (2, 3):
            _runtime.set_threads(count)
            assert _runtime.pool_selftest(4000, 64) == 0
    finally:
        _runtime.set_threads(1)
        spin.kill()
        spin.wait()


@pytest.mark.parametrize("level", range(5, -1, -1))
def test_every_operation_is_bit_exact_with_seal(nb, isa, threads, level):
    sb, ev = nb.seal, nb.seal.evaluator
    rng = np.random.default_rng(level)
    x, y = rng.uniform(-1, 1, nb.slots), rng.uniform(-1, 1, nb.slots)
    sx = sb.encrypt(sb.encode(x, level, _scale(level)))
    sy = sb.encrypt(sb.encode(y, level, _scale(level)))
    px = sb.encode(y, level, _scale(level))
    nx, ny, pn = nb.from_seal(sx), nb.from_seal(sy), nb.plain_from_seal(px, level)
    assert _same(nb, nx, sx)
    assert _same(nb, nb.add(nx, ny), ev.add(sx, sy))
    assert _same(nb, nb.sub(nx, ny), ev.sub(sx, sy))
    assert _same(nb, nb.negate(nx), ev.negate(sx))
    assert _same(nb, nb.add_plain(nx, pn), ev.add_plain(sx, px))
    assert _same(nb, nb.multiply_plain(nx, pn), ev.multiply_plain(sx, px))
    n3, s3 = nb.multiply(nx, ny), ev.multiply(sx, sy)
    assert _same(nb, n3, s3)
    assert _same(nb, nb.relinearize(n3), sb.relinearize(s3))
    for step in STEPS:
        assert _same(nb, nb.rotate(nx, step), sb.rotate(sx, step)), step
    assert _same(nb, nb.conjugate(nx), sb.conjugate(sx))
    if level:
        assert _same(nb, nb.rescale(nx), ev.rescale_to_next(sx))
        assert _same(nb, nb.mod_switch(nx, level - 1), sb.mod_switch(sx, level - 1))
        big = ev.multiply_plain(sx, px)
        assert _same(nb, nb.rescale(nb.from_seal(big)), ev.rescale_to_next(big))


WIDE = CKKSParams(8192, (51, 37, 37, 51), 37)  # primes above 2^50: the IFMA transforms' narrow mode


@pytest.mark.parametrize("level", [2, 1, 0])
def test_wide_primes_are_bit_exact_too(isa, level):
    be = native.NativeBackend(WIDE)
    be.keygen([1, -5], True)
    sb, ev = be.seal, be.seal.evaluator
    rng = np.random.default_rng(level)
    scale = 2.0 ** (37 if level else 24)
    x, y = rng.uniform(-1, 1, be.slots), rng.uniform(-1, 1, be.slots)
    sx, sy = sb.encrypt(sb.encode(x, level, scale)), sb.encrypt(sb.encode(y, level, scale))
    px = sb.encode(y, level, scale)
    nx, ny, pn = be.from_seal(sx), be.from_seal(sy), be.plain_from_seal(px, level)
    assert _same(be, be.multiply_plain(nx, pn), ev.multiply_plain(sx, px))
    n3, s3 = be.multiply(nx, ny), ev.multiply(sx, sy)
    assert _same(be, be.relinearize(n3), sb.relinearize(s3))
    for step in (1, -5):
        assert _same(be, be.rotate(nx, step), sb.rotate(sx, step))
    if level:
        big = ev.multiply_plain(sx, px)
        assert _same(be, be.rescale(be.from_seal(big)), ev.rescale_to_next(big))


def test_ntt_array_api_matches_seal_plaintexts(nb, isa):
    """ntt_inverse then ntt_forward of SEAL's NTT-form residues is the identity, limb by limb."""
    plain = nb.seal.encode(np.linspace(-1, 1, nb.slots), nb.top, 2.0 ** 27)
    arr = nb.plain_from_seal(plain, nb.top)
    ct = nb.encrypt_values(np.linspace(-1, 1, nb.slots), nb.top, 2.0 ** 27)
    res = ct.to_array()
    work = res.copy()
    nb.ctx.ntt_inverse(work)
    assert not np.array_equal(work, res)
    nb.ctx.ntt_forward(work)
    assert np.array_equal(work, res)
    assert arr.level == nb.top


@pytest.mark.parametrize("level", [5, 2])
def test_hoisted_rotations_decrypt_like_seal(nb, isa, level):
    sb = nb.seal
    rng = np.random.default_rng(10 + level)
    x = rng.uniform(-1, 1, nb.slots)
    sx = sb.encrypt(sb.encode(x, level, 2.0 ** 27))
    nx = nb.from_seal(sx)
    want = {s: sb.decrypt(sb.rotate(sx, s)) for s in STEPS}
    for step, got in zip(STEPS, nb.rotate_hoisted(nx, STEPS)):
        truth = np.roll(x, -step)
        seal_err = np.abs(want[step] - truth).max()  # SEAL's own rotation noise; ours is independent, as large
        assert np.abs(nb.decrypt(got) - truth).max() <= 3 * seal_err + 2e-5
        assert np.abs(nb.decrypt(got) - want[step]).max() < 5e-4
    ys = [rng.uniform(-1, 1, nb.slots) for _ in range(4)]
    cts = [nb.encrypt_values(y, level, 2.0 ** 27) for y in ys]
    steps = [0, 1, 64, -17]  # 0: this term unrotated
    total = nb.ctx.rotate_sum(cts, steps, nb.keys)
    expect = sum(np.roll(y, -s) for y, s in zip(ys, steps))
    assert np.abs(nb.decrypt(total) - expect).max() < 1e-3


def _pneumonia(n: int, data_dir):
    with np.load(data_dir / "pneumoniamnist.npz") as d:
        images = d["test_images"][:n]
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]


def test_whole_plan_native_agrees_with_seal_on_50_images(data_dir):
    from medhe.he import client_for
    from medhe.he.ckks.server import compile_ckks
    from medhe.models.artifact import load_artifact

    art = load_artifact("pneumoniamnist")
    seal_srv = compile_ckks(art, backend="seal")
    nat_srv = compile_ckks(art, backend="native")
    assert nat_srv.backend.name == "native" and nat_srv.report_params()["backend"] == "native"
    exact = nat_srv.backend.compile(nat_srv.plan, nat_srv.plains, hoist=False)
    client = client_for(json.loads(json.dumps(seal_srv.spec())))
    client.keygen()
    key_bytes = client.evaluation_keys()
    ks, kn = seal_srv.load_keys(key_bytes), nat_srv.load_keys(key_bytes)
    images = _pneumonia(50, data_dir)
    with torch.no_grad():
        plain = art.model(torch.tensor(images)).numpy()
    errs, agree = [], []
    for i, x in enumerate(images):
        ct = client.encrypt(x)
        got_seal = client.decrypt(seal_srv.infer(ks, ct))
        got_nat = client.decrypt(nat_srv.infer(kn, ct))
        errs.append(float(np.abs(got_nat - got_seal).max()))
        agree.append(int(np.argmax(got_nat)) == int(np.argmax(got_seal)))
        assert np.abs(got_nat - plain[i]).max() < 1e-2
        if i < 3:  # without hoisting the native run is SEAL's, byte for byte
            out_seal = seal_srv.evaluate(ks, seal_srv.load_inputs(ct))
            out_exact = exact.evaluate(kn.galois, nat_srv.load_inputs(ct))
            assert nat_srv.backend.serialize(out_exact) == seal_srv.backend.serialize(out_seal)
    assert all(agree)
    assert max(errs) <= 1e-2


def _mutations(data: bytes, rng: np.random.Generator, count: int):
    n = len(data)
    for i in range(count):
        kind = i % 4
        if kind == 0:
            yield data[: int(rng.integers(0, n))]
        elif kind == 1:
            b = bytearray(data)
            pos = int(rng.integers(0, min(n, 200))) if i % 8 == 1 else int(rng.integers(0, n))
            b[pos] ^= 1 << int(rng.integers(0, 8))
            yield bytes(b)
        elif kind == 2:
            yield data + bytes(int(rng.integers(1, 64)))
        else:
            b = bytearray(data)
            pos = int(rng.integers(0, 120))
            b[pos:pos + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            yield bytes(b)


def test_malformed_ciphertexts_and_keys_raise_ciphertext_error(nb):
    rng = np.random.default_rng(7)
    ct = nb.encrypt_values(rng.uniform(-1, 1, nb.slots), nb.top, 2.0 ** 27)
    raw = nb.ctx.save_ciphertext(ct)
    wire = nb.serialize(ct)
    start = time.perf_counter()
    loaded = refused = 0
    for data in list(_mutations(raw, rng, 200)):
        try:
            nb.ctx.load_ciphertext(data)
            loaded += 1  # a flipped coefficient bit can leave a valid ciphertext
        except _runtime.InputError:
            refused += 1
    for data in list(_mutations(wire, rng, 100)):
        with pytest.raises(CiphertextError):
            nb.load_ciphertext(data)
    keys_raw = nb.seal.relin_keys.to_string()
    for data in list(_mutations(keys_raw, rng, 40)):
        try:
            nb.ctx.load_keys(b"", data)
        except _runtime.InputError:
            refused += 1
    assert refused > 200 and time.perf_counter() - start < 60
    with pytest.raises(CiphertextError):
        nb.ctx and nb.plain_from_seal(nb.seal.encode(1.0, 3, 2.0 ** 27), 4)  # wrong level for the bytes
    low = nb.mod_switch(ct, 2)
    with pytest.raises(CiphertextError, match="level"):
        nb.add(ct, low)
    with pytest.raises(CiphertextError, match="level"):
        nb.multiply_plain(ct, nb.encode(1.0, 2, 2.0 ** 27))
    with pytest.raises(CiphertextError, match="scale"):
        nb.add(ct, nb.encrypt_values(np.zeros(nb.slots), nb.top, 2.0 ** 26))
    with pytest.raises(CiphertextError, match="level 0"):
        nb.rescale(nb.mod_switch(ct, 0))
    with pytest.raises(_runtime.InputError):
        nb.ctx.ciphertext(np.zeros((2, 3, 8192), dtype=np.uint64), 5, 1.0)  # wrong limb count
    with pytest.raises(_runtime.InputError):
        nb.ctx.ciphertext(np.full((2, 6, 8192), 2 ** 62, dtype=np.uint64), 5, 1.0)  # outside the primes
    fresh = nb.fresh()
    with pytest.raises(CiphertextError, match="no evaluation keys"):
        fresh.rotate(ct, 1)


def test_program_refuses_wrong_inputs(nb):
    from medhe.he.ckks.compiler.driver import compile_plan
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    plan = compile_plan(model, (1, 4, 4), None)
    be = native.NativeBackend(plan.params)
    be.keygen(plan.rotation_steps, plan.needs_relin)
    plains = [be.encode(p.values, p.level, p.scale) for p in plan.plains]
    prog = be.compile(plan, plains)
    good = be.encrypt_values(np.zeros(be.slots), plan.input_level, plan.input_scale)
    prog.evaluate(be.keys, [good] * plan.input_ciphertexts)
    with pytest.raises(CiphertextError):
        prog.evaluate(be.keys, [good] * (plan.input_ciphertexts + 1))
    if plan.input_level > 0:
        with pytest.raises(CiphertextError):
            prog.evaluate(be.keys, [be.mod_switch(good, plan.input_level - 1)] * plan.input_ciphertexts)
    with pytest.raises(_runtime.InputError):
        be.ctx.program([(99, 0, 0, 0, 0, [], [], [], [], [])], plains, 2, 1, 1)


def test_thread_chooser_follows_measured_times(monkeypatch):
    monkeypatch.delenv("MEDHE_NATIVE_THREADS", raising=False)
    chooser = native.ThreadChooser(explore=4)
    chooser.options = [1, 2]  # as on a 2-core machine
    cost = {1: 1.0, 2: 0.6}
    picks = []
    for _ in range(16):
        k = chooser.pick()
        picks.append(k)
        chooser.record(k, cost[k])
    assert picks[:2] == [1, 2] and picks.count(2) > picks.count(1)
    cost[2] = 3.0  # the other core got busy: two threads now lose
    for _ in range(24):
        k = chooser.pick()
        chooser.record(k, cost[k])
    assert min(chooser.mean, key=chooser.mean.get) == 1
    monkeypatch.setenv("MEDHE_NATIVE_THREADS", "1")
    assert native.ThreadChooser().options == [1]


def test_keys_from_seal_is_the_public_way_to_hand_seal_keys_to_the_runtime(nb):
    """A server-side backend that never generated keys turns SEAL key objects into runtime keys (what the batch
    boundary does with a client's relinearization keys), and relinearizes bit for bit like SEAL."""
    assert not hasattr(nb, "_keys_from_seal")
    server = native.NativeBackend(PARAMS)
    keys = server.keys_from_seal(None, nb.seal.relin_keys)
    assert server.keys is None  # handed back to the caller, not stored
    sb, level = nb.seal, 3
    rng = np.random.default_rng(7)
    sx = sb.encrypt(sb.encode(rng.uniform(-1, 1, nb.slots), level, _scale(level)))
    sy = sb.encrypt(sb.encode(rng.uniform(-1, 1, nb.slots), level, _scale(level)))
    s3 = sb.evaluator.multiply(sx, sy)
    ours = server.ctx.relinearize(server.from_seal(s3), keys)
    assert np.array_equal(ours.to_array(), server.from_seal(sb.relinearize(s3)).to_array())
