"""Hybrid key-switching keys made on the client from SEAL's samplers (issue 29, step 1).

Real SEAL keys and encryptions of real medhe chains at N=8192. Every digit of every key must decrypt (SEAL's
Decryptor, the same secret) to P g_j s' plus one small integer error polynomial -- the same integer on every prime
of Q*P --, the errors must follow SEAL's own distribution (two-sample chi-square against SEAL's symmetric
encryption in the client context, and the moments of SEAL's clipped Gaussian), and nothing sent may carry the
secret. The layout's checks (special primes covering each digit, 128-bit with the special primes counted) are
tested here too.
"""

from __future__ import annotations

import numpy as np
import pytest
import seal
from scipy.stats import chi2_contingency

from medhe.errors import PlanError, SecurityError
from medhe.he.ckks.compiler.params import coeff_modulus
from medhe.he.ckks.hybrid import sealctx
from medhe.he.ckks.hybrid.keygen import HybridKeyGenerator, galois_permutation, mulmod
from medhe.he.ckks.hybrid.layout import HybridLayout

runtime = pytest.importorskip("medhe.he.ckks._runtime", reason="native runtime not built")  # its NTT, for checks

N = 8192
SIGMA = 3.2  # SEAL's default noise standard deviation, clipped at 6 sigma
_P = coeff_modulus(N, (38, 27, 27, 27, 27, 35, 35))
LAYOUT = HybridLayout(N, _P[:5], _P[5:], 2)  # digits of 65, 54 and 27 bits under a 70-bit P; 216 bits in all


@pytest.fixture(scope="module")
def gen() -> HybridKeyGenerator:
    return HybridKeyGenerator(LAYOUT)


def _ntt_context(primes: tuple[int, ...]):
    """A runtime context used only for its NTT over ``primes`` (SEAL's transform, word for word)."""
    return runtime.Context(list(primes), N.bit_length() - 1, [bytes(32)] * (len(primes) - 1), bytes(32))


def _centered_coefficients(residues: np.ndarray, primes: tuple[int, ...]) -> np.ndarray:
    """NTT residues (limbs, n) -> coefficient form, each limb's values centered into (-q/2, q/2]."""
    coeffs = np.ascontiguousarray(residues, dtype=np.uint64).copy()
    _ntt_context(primes).ntt_inverse(coeffs)
    out = np.empty(coeffs.shape, dtype=np.int64)
    for i, q in enumerate(primes):
        c = coeffs[i].astype(np.int64)
        out[i] = np.where(c > q // 2, c - q, c)
    return out


def _error(decrypted: np.ndarray, target: np.ndarray, primes: tuple[int, ...]) -> np.ndarray:
    """The error polynomial of b + a s - target, checked to be one integer polynomial on every prime."""
    diff = np.stack([((decrypted[i].astype(object) - target[i].astype(object)) % q).astype(np.uint64)
                     for i, q in enumerate(primes)])
    e = _centered_coefficients(diff, primes)
    assert (e == e[0]).all(), "the error differs between primes: not a small integer polynomial"
    return e[0]


def test_mulmod_is_exact_for_sixty_bit_primes():
    rng = np.random.default_rng(0)
    for q in (_P[1], _P[0], _P[5], coeff_modulus(N, (60,))[0]):
        a = rng.integers(0, q, 20000, dtype=np.uint64)
        b = rng.integers(0, q, 20000, dtype=np.uint64)
        ref = np.array([int(x) * int(y) % q for x, y in zip(a, b)], dtype=np.uint64)
        assert np.array_equal(mulmod(a, b, q), ref)


def test_layout_refuses_uncovered_digits_and_counts_special_primes_for_128_bits():
    assert LAYOUT.check().dnum == 3 and LAYOUT.digit(2) == (4,)
    with pytest.raises(PlanError, match="must cover each digit"):
        HybridLayout(N, _P[:5], _P[5:6], 2).check()  # 35-bit P under a 65-bit digit
    wide = coeff_modulus(N, (38, 27, 27, 27, 27, 40, 40))  # Q = 146 bits alone is fine; Q*P = 226 > 218
    with pytest.raises(SecurityError, match="below 128-bit security"):
        HybridLayout(N, wide[:5], wide[5:], 2).check()
    with pytest.raises(PlanError):
        HybridLayout(N, _P[:5], _P[5:], 0).check()


def test_client_secret_is_the_key_contexts_ternary_secret(gen):
    """The client's SEAL secret key and the key context's secret are one s: same residues, ternary coefficients."""
    s = gen.secret_residues_for_tests()
    client = sealctx.plain_residues(gen.secret_key.to_string(), LAYOUT.levels + 1, N)
    assert np.array_equal(client[:LAYOUT.levels], s[:LAYOUT.levels])
    assert np.array_equal(client[LAYOUT.levels], s[LAYOUT.levels])
    coeffs = _centered_coefficients(s, LAYOUT.primes)
    assert (coeffs == coeffs[0]).all() and set(np.unique(coeffs[0])) == {-1, 0, 1}
    # SEAL's uniform ternary secret: each value about a third of the coefficients
    counts = np.array([(coeffs[0] == v).sum() for v in (-1, 0, 1)])
    assert (np.abs(counts / N - 1 / 3) < 0.03).all()


@pytest.mark.parametrize("target", ["relin", 3, 2 * N - 1])
def test_every_digit_decrypts_to_the_gadget_scaled_target_plus_small_error(gen, target):
    if target == "relin":
        digits, s_prime = gen.relin_key(), gen.squared_secret()
        s = gen.secret_residues_for_tests()
        assert np.array_equal(s_prime[0], mulmod(s[0], s[0], LAYOUT.primes[0]))
    else:
        digits, s_prime = gen.galois_key(target), gen.rotated_secret(target)
        assert np.array_equal(s_prime, gen.secret_residues_for_tests()[:, galois_permutation(N, target)])
    assert len(digits) == LAYOUT.dnum
    for j, raw in enumerate(digits):
        goal = gen.gadget_target(s_prime, j)
        # P g_j s' is P s' on the digit's primes and 0 elsewhere (other data primes and every special prime)
        for i in range(len(LAYOUT.primes)):
            if i not in LAYOUT.digit(j):
                assert not goal[i].any()
        e = _error(gen.decrypt_residues(raw), goal, LAYOUT.primes)
        assert np.abs(e).max() <= 6 * SIGMA and 0.8 * SIGMA < e.std() < 1.2 * SIGMA


def _seal_errors(gen: HybridKeyGenerator, count: int) -> np.ndarray:
    """Errors of SEAL's own symmetric encryptions of zero in the client context (same secret)."""
    ctx = gen.context
    enc, dec = seal.Encryptor(ctx, gen.secret_key), seal.Decryptor(ctx, gen.secret_key)
    zero = seal.CKKSEncoder(ctx).encode(0.0, 2.0 ** 20)
    primes = LAYOUT.data_primes
    out = []
    for _ in range(count):
        plain = dec.decrypt(enc.encrypt_symmetric(zero))
        e = _centered_coefficients(sealctx.plain_residues(plain.to_bytes(), len(primes), N), primes)
        assert (e == e[0]).all()
        out.append(e[0])
    return np.concatenate(out)


def test_key_errors_follow_seals_distribution(gen):
    """Over ~110k coefficients: the keys' errors against SEAL's own encryption errors (chi-square, two samples) and
    against the clipped Gaussian's moments (mean 0, variance sigma^2, kurtosis 3, nothing beyond 6 sigma)."""
    errors = []
    for digits, s_prime in [(gen.relin_key(), gen.squared_secret())] + [
            (gen.galois_key(elt), gen.rotated_secret(elt)) for elt in (5, 2 * N - 1, 25)]:
        for j, raw in enumerate(digits):
            errors.append(_error(gen.decrypt_residues(raw), gen.gadget_target(s_prime, j), LAYOUT.primes))
    ours_e = np.concatenate(errors)
    seal_e = _seal_errors(gen, 12)
    bins = np.arange(-8, 10) - 0.5  # -8..8 plus both tails
    edges = np.concatenate([[-np.inf], bins, [np.inf]])
    table = np.stack([np.histogram(ours_e, edges)[0], np.histogram(seal_e, edges)[0]])
    table = table[:, table.min(axis=0) > 0]
    p_value = chi2_contingency(table)[1]
    assert p_value > 1e-4, f"keys' errors differ from SEAL's (chi-square p={p_value:.2g})"
    for e in (ours_e, seal_e):
        assert abs(e.mean()) < 0.05
        assert abs(e.var() / SIGMA ** 2 - 1) < 0.04
        kurtosis = ((e - e.mean()) ** 4).mean() / e.var() ** 2
        assert abs(kurtosis - 3) < 0.15
        assert np.abs(e).max() <= 6 * SIGMA


def test_keys_as_sent_carry_no_secret(gen):
    """The frames are seeded, CRC-checked SEAL ciphertexts: no 32-byte run of s's residues (nor of the client's
    secret-key file) occurs in them, and they are well under the raw residues."""
    frames = gen.compact_key(gen.galois_key(3))
    sent = b"".join(frames)
    assert len(frames) == LAYOUT.dnum
    assert len(sent) < 0.6 * LAYOUT.key_words() * 8  # seeded and bit-packed
    for secret in (gen.secret_residues_for_tests().tobytes(), gen.secret_key.to_string()):
        for off in range(0, len(secret) - 32, 4096):
            assert secret[off:off + 32] not in sent
