"""Compact SEAL serialization: lossless (byte-identical) and strict about what it accepts."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import seal

from medhe.errors import CiphertextError
from medhe.he.ckks.wire import bits as B
from medhe.he.ckks.wire import serialize as S
from medhe.he.ckks.wire.seeder import Seeder

CHAIN = [35, 28, 28, 28, 28, 28, 43]


def _context(n: int, bits: list[int]) -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.scheme_type.ckks)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(n, bits))
    return seal.SEALContext(parms, True, seal.sec_level_type.tc128)


@pytest.fixture(scope="module")
def he():
    ctx = _context(8192, CHAIN)
    keygen = seal.KeyGenerator(ctx)
    enc = seal.Encryptor(ctx, keygen.secret_key())
    encoder = seal.CKKSEncoder(ctx)
    rng = np.random.default_rng(0)
    ct = enc.encrypt_symmetric(encoder.encode(rng.uniform(-1, 1, 4096), 2.0 ** 28))
    galois = seal.GaloisKeys()
    keygen.create_galois_keys([1, -3], galois)
    return {"ctx": ctx, "keygen": keygen, "ct": ct, "galois": galois, "relin": keygen.create_relin_keys(),
            "evaluator": seal.Evaluator(ctx), "encoder": encoder, "decryptor": seal.Decryptor(ctx, keygen.secret_key())}


def _raw_ratio(ctx: seal.SEALContext, ct: seal.Ciphertext) -> float:
    moduli = ctx.get_context_data(ct.parms_id()).parms().coeff_modulus()
    return sum(m.bit_count() for m in moduli) / (64 * len(moduli))


@pytest.mark.parametrize("bits", range(1, 65))
def test_bit_packing_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2 ** bits - 1, size=8192, dtype=np.uint64, endpoint=True)
    packed = B.pack_bits(values, bits)
    assert len(packed) == 8192 * bits // 8
    assert np.array_equal(B.unpack_bits(packed, 8192, bits), values)


def test_ciphertext_round_trip_is_byte_identical_at_every_level(he):
    ctx, ev, ct = he["ctx"], he["evaluator"], seal.Ciphertext(he["ct"])
    levels = 0
    while True:
        raw = ct.to_string()
        data = S.dump_ciphertext(ct, ctx)
        assert S.load_ciphertext(data, ctx).to_string() == raw
        # per-prime packing saves exactly the unused high bits (plus a small frame)
        assert len(data) <= len(raw) * _raw_ratio(ctx, ct) + 512
        levels += 1
        if ctx.get_context_data(ct.parms_id()).chain_index() == 0:
            break
        ev.mod_switch_to_next_inplace(ct)
    assert levels == 6


def test_size_three_ciphertext_round_trip_and_decrypts_the_same(he):
    ctx, ct = he["ctx"], seal.Ciphertext(he["ct"])
    he["evaluator"].square_inplace(ct)
    assert ct.size() == 3
    back = S.load_ciphertext(S.dump_ciphertext(ct, ctx), ctx)
    assert back.to_string() == ct.to_string()
    a = he["encoder"].decode(he["decryptor"].decrypt(ct))
    b = he["encoder"].decode(he["decryptor"].decrypt(back))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_key_round_trips_are_byte_identical_and_about_half_size(he):
    ctx = he["ctx"]
    ratio = sum(CHAIN) / (64 * len(CHAIN))  # keys live at the key level: every prime
    for keys, dump, load in [(he["galois"], S.dump_galois_keys, S.load_galois_keys),
                             (he["relin"], S.dump_relin_keys, S.load_relin_keys),
                             (he["keygen"].create_public_key(), S.dump_public_key, S.load_public_key)]:
        raw = keys.to_string()
        data = dump(keys, ctx)
        assert load(data, ctx).to_string() == raw
        assert len(data) <= len(raw) * ratio + 1024


def test_loaded_galois_keys_still_rotate(he):
    ctx, ev = he["ctx"], he["evaluator"]
    keys = S.load_galois_keys(S.dump_galois_keys(he["galois"], ctx), ctx)
    rotated = ev.rotate_vector(he["ct"], 1, keys)
    before = np.asarray(he["encoder"].decode(he["decryptor"].decrypt(he["ct"])))
    after = np.asarray(he["encoder"].decode(he["decryptor"].decrypt(rotated)))
    assert np.allclose(after, np.roll(before, -1), atol=1e-4)


def test_n16384_round_trip():
    ctx = _context(16384, [50] + [40] * 8 + [50])
    keygen = seal.KeyGenerator(ctx)
    ct = seal.Encryptor(ctx, keygen.secret_key()).encrypt_symmetric(
        seal.CKKSEncoder(ctx).encode(np.linspace(-1, 1, 8192), 2.0 ** 40))
    data = S.dump_ciphertext(ct, ctx)
    assert S.load_ciphertext(data, ctx).to_string() == ct.to_string()
    assert len(data) < 0.7 * len(ct.to_string())


def test_truncated_input_is_rejected(he):
    data = S.dump_ciphertext(he["ct"], he["ctx"])
    for cut in (0, 10, S._FRAME.size + 5, len(data) // 2, len(data) - 1):
        with pytest.raises(CiphertextError, match="truncated|garbled"):
            S.load_ciphertext(data[:cut], he["ctx"])
    with pytest.raises(CiphertextError, match="truncated|garbled"):
        S.load_galois_keys(S.dump_galois_keys(he["galois"], he["ctx"])[:-100], he["ctx"])


def test_garbled_input_is_rejected(he):
    data = bytearray(S.dump_ciphertext(he["ct"], he["ctx"]))
    for pos in (0, 5, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(CiphertextError):
            S.load_ciphertext(bytes(bad), he["ctx"])
    with pytest.raises(CiphertextError, match="bytes"):
        S.load_ciphertext("not bytes", he["ctx"])


def test_coefficient_outside_its_prime_is_rejected_even_with_a_valid_checksum(he):
    data = bytearray(S.dump_ciphertext(he["ct"], he["ctx"]))
    skel_len = struct.unpack_from("<I", data, S._FRAME.size - 4)[0]
    start = S._FRAME.size + skel_len
    data[start:start + 8] = b"\xff" * 8  # the first coefficient of the narrowest primes becomes 2**bits - 1 > q
    struct.pack_into("<I", data, S._FRAME.size - 8, zlib.crc32(bytes(data[S._FRAME.size:])))
    with pytest.raises(CiphertextError, match="outside its prime"):
        S.load_ciphertext(bytes(data), he["ctx"])


def test_other_parameters_and_wrong_kind_are_rejected(he):
    other = _context(8192, [40, 30, 30, 30, 40])
    with pytest.raises(CiphertextError, match="other encryption parameters"):
        S.load_ciphertext(S.dump_ciphertext(he["ct"], he["ctx"]), other)
    with pytest.raises(CiphertextError, match="other encryption parameters"):
        S.dump_ciphertext(he["ct"], other)  # parms_id unknown to that context
    with pytest.raises(CiphertextError, match="expected CKKS Galois keys"):
        S.load_galois_keys(S.dump_relin_keys(he["relin"], he["ctx"]), he["ctx"])
    with pytest.raises(CiphertextError, match="key level"):
        S.load_ciphertext(S.compact(he["keygen"].create_public_key().to_string(), S.KIND_CIPHERTEXT, he["ctx"]),
                          he["ctx"])


@pytest.mark.parametrize("bits", [5, 28, 43, 57, 58, 63])
def test_bit_packing_counts_not_a_multiple_of_eight(bits):
    values = np.arange(13, dtype=np.uint64) % (2 ** bits)
    packed = B.pack_bits(values, bits)
    assert len(packed) == (13 * bits + 7) // 8
    assert np.array_equal(B.unpack_bits(packed, 13, bits), values)


def test_seeded_ciphertext_is_half_size_and_decrypts_to_the_same_values(he):
    ctx, dec, enc = he["ctx"], he["decryptor"], he["encoder"]
    seeder = Seeder(ctx, he["keygen"].secret_key())
    plain = S.dump_ciphertext(he["ct"], ctx)
    seeded = S.dump_ciphertext(he["ct"], ctx, seeder)
    assert len(seeded) < 0.51 * len(plain)
    back = S.load_ciphertext(seeded, ctx)
    assert back.parms_id() == he["ct"].parms_id() and back.scale() == he["ct"].scale()
    expected = np.asarray(enc.decode(dec.decrypt(he["ct"])))
    assert np.allclose(np.asarray(enc.decode(dec.decrypt(back))), expected, atol=1e-5)
    # the seeded SEAL form itself round-trips byte for byte through the compact frame
    raw = seeder.seed_ciphertext(he["ct"])
    assert S.expand(S.compact(raw, S.KIND_CIPHERTEXT, ctx), S.KIND_CIPHERTEXT, ctx) == raw
    # the metadata the seeder writes is exactly SEAL's own
    meta = slice(S._SEAL_HEADER.size, S._SEAL_HEADER.size + S._CT_META.size)
    assert raw[meta] == he["ct"].to_string()[meta]


def test_two_encodings_of_one_ciphertext_carry_independent_noise(he):
    """Same noise in two encodings would make their difference an exact multiple of s: the key would leak."""
    ctx, dec = he["ctx"], he["decryptor"]
    seeder = Seeder(ctx, he["keygen"].secret_key())
    one = S.load_ciphertext(S.dump_ciphertext(he["ct"], ctx, seeder), ctx)
    two = S.load_ciphertext(S.dump_ciphertext(he["ct"], ctx, seeder), ctx)
    phases = {dec.decrypt(c).to_bytes() for c in (one, two, he["ct"])}
    assert len(phases) == 3


def test_seeded_keys_are_half_size_and_work(he):
    ctx, ev, enc, dec = he["ctx"], he["evaluator"], he["encoder"], he["decryptor"]
    seeder = Seeder(ctx, he["keygen"].secret_key())
    data = S.dump_galois_keys(he["galois"], ctx, seeder)
    assert len(data) < 0.51 * len(S.dump_galois_keys(he["galois"], ctx))
    galois = S.load_galois_keys(data, ctx)
    before = np.asarray(enc.decode(dec.decrypt(he["ct"])))
    after = np.asarray(enc.decode(dec.decrypt(ev.rotate_vector(he["ct"], -3, galois))))
    assert np.allclose(after, np.roll(before, 3), atol=1e-4)
    relin = S.load_relin_keys(S.dump_relin_keys(he["relin"], ctx, seeder), ctx)
    sq = ev.square(he["ct"])
    ev.relinearize_inplace(sq, relin)
    assert sq.size() == 2
    assert np.allclose(np.asarray(enc.decode(dec.decrypt(sq))), before ** 2, atol=1e-4)


def test_seeder_refuses_non_fresh_ciphertexts(he):
    seeder = Seeder(he["ctx"], he["keygen"].secret_key())
    with pytest.raises(CiphertextError, match="only size-2"):
        S.dump_ciphertext(he["evaluator"].square(he["ct"]), he["ctx"], seeder)


def test_raw_size_reports_seal_bytes_without_unpacking(he):
    ctx = he["ctx"]
    seeder = Seeder(ctx, he["keygen"].secret_key())
    for obj, dump, kind in [(he["ct"], S.dump_ciphertext, S.KIND_CIPHERTEXT),
                            (he["galois"], S.dump_galois_keys, S.KIND_GALOIS),
                            (he["relin"], S.dump_relin_keys, S.KIND_RELIN)]:
        raw = len(obj.to_string())
        assert S.raw_size(dump(obj, ctx), kind, ctx) == raw
        assert S.raw_size(dump(obj, ctx, seeder), kind, ctx) == raw  # seeds count as the polynomials they expand to


def test_oversized_skeleton_is_refused_without_inflating_it(he):
    skeleton = zlib.compress(b"\0" * (S._MAX_SKELETON + 1024), 9)
    body = skeleton
    frame = S._FRAME.pack(S.MAGIC, S.FORMAT_VERSION, S.KIND_GALOIS, 0, S.params_fingerprint(he["ctx"]),
                          zlib.crc32(body), len(skeleton)) + body
    with pytest.raises(CiphertextError, match="garbled"):
        S.load_galois_keys(frame, he["ctx"])


def test_serialization_benchmark_reports_sizes_and_times():
    from medhe.he.ckks.bench import run_serialization_benchmark

    report = run_serialization_benchmark(chains={8192: CHAIN}, repeats=1, rotation_steps=(1,))
    ct = report["rings"]["8192"]["input_ciphertext"]
    assert ct["raw"] > 2 * ct["compact"] > 3.9 * ct["compact_seeded"]
    assert report["rings"]["8192"]["galois_key_per_step"]["compact_seeded"] < 0.26 * \
        report["rings"]["8192"]["galois_key_per_step"]["raw"]


def test_seal_level_problems_become_ciphertext_errors(he):
    ctx = he["ctx"]
    seeded = bytearray(Seeder(ctx, he["keygen"].secret_key()).seed_ciphertext(he["ct"]))
    seeded[-65] = 7  # the PRNG type byte of the seed: no such generator
    with pytest.raises(CiphertextError, match="SEAL rejected"):
        S.load_ciphertext(S.compact(bytes(seeded), S.KIND_CIPHERTEXT, ctx), ctx)
    coeff_form = bytearray(he["ct"].to_string())
    coeff_form[S._SEAL_HEADER.size + 32] = 0  # is_ntt_form = false
    with pytest.raises(CiphertextError, match="NTT form"):
        S.load_ciphertext(S.compact(bytes(coeff_form), S.KIND_CIPHERTEXT, ctx), ctx)


def test_seeder_encrypt_goes_straight_to_seeded_bytes(he):
    ctx, enc, dec = he["ctx"], he["encoder"], he["decryptor"]
    seeder = Seeder(ctx, he["keygen"].secret_key())
    values = np.linspace(-1, 1, 4096)
    plain = enc.encode(values, 2.0 ** 28)
    data = seeder.encrypt(plain)
    assert len(data) < 0.51 * len(S.dump_ciphertext(he["ct"], ctx))
    ct = S.load_ciphertext(data, ctx)
    assert np.allclose(np.asarray(enc.decode(dec.decrypt(ct))), values, atol=1e-5)
    assert seeder.encrypt(plain) != data  # fresh randomness every time


def test_level_trimmed_keys_give_bit_identical_results_where_the_plan_uses_them(he):
    """Keys sent without the digits and primes above their level switch exactly like whole keys at or below it."""
    ctx, ev = he["ctx"], he["evaluator"]
    seeder = Seeder(ctx, he["keygen"].secret_key())
    raw_g, raw_r = seeder.seed_kswitch(he["galois"].to_string()), seeder.seed_kswitch(he["relin"].to_string())
    i1 = S.galois_key_index(3)  # step 1
    im3 = S.galois_key_index(pow(3, 4096 - 3, 2 * 8192))  # step -3
    keep = {i1: 2, im3: 0}
    whole_g = S.load_galois_keys(S.compact(raw_g, S.KIND_GALOIS, ctx), ctx)
    trimmed = S.compact(raw_g, S.KIND_GALOIS, ctx, keep)
    assert len(trimmed) < 0.3 * len(S.compact(raw_g, S.KIND_GALOIS, ctx))
    part_g = S.load_galois_keys(trimmed, ctx, need=keep)
    whole_r = S.load_relin_keys(S.compact(raw_r, S.KIND_RELIN, ctx), ctx)
    part_r = S.load_relin_keys(S.compact(raw_r, S.KIND_RELIN, ctx, {S.RELIN_KEY_INDEX: 1}), ctx,
                               need={S.RELIN_KEY_INDEX: 1})
    ct = seal.Ciphertext(he["ct"])
    for level in range(5, -1, -1):
        if level <= 2:
            assert ev.rotate_vector(ct, 1, part_g).to_string() == ev.rotate_vector(ct, 1, whole_g).to_string()
        if level == 0:
            assert ev.rotate_vector(ct, -3, part_g).to_string() == ev.rotate_vector(ct, -3, whole_g).to_string()
        if level == 1:
            sq = ev.square(ct)
            assert ev.relinearize(sq, part_r).to_string() == ev.relinearize(sq, whole_r).to_string()
        if level:
            ev.mod_switch_to_next_inplace(ct)


def test_keys_trimmed_below_the_plans_needs_are_refused(he):
    ctx = he["ctx"]
    seeder = Seeder(ctx, he["keygen"].secret_key())
    i1 = S.galois_key_index(3)
    data = S.dump_galois_keys(he["galois"], ctx, seeder, keep={i1: 1})
    with pytest.raises(CiphertextError, match="trimmed below what this model needs"):
        S.load_galois_keys(data, ctx, need={i1: 3})
    S.load_galois_keys(data, ctx, need={i1: 1})
    ct = S.dump_ciphertext(he["ct"], ctx)
    with pytest.raises(CiphertextError, match="unknown flags"):  # trimming applies to keys only
        S.load_ciphertext(ct[:6] + b"\x01\x00" + ct[8:], ctx)
