"""Server side of Paillier inference: a private affine head evaluated on the client's encrypted feature vector.

The server holds W (K x d) and b (K) as fixed-point integers and only the client's public key n. For each
request it computes, on ciphertexts only,

    A_j = prod_i Enc(X_i)**W_ji            (negative weights: one modular inverse of the negative part per output)
    C   = Enc(sum_j S_j 2**(j s)) = (...(A_last**(2**s)) * ...) * A_0 * (1 + B n)   (all outputs in one ciphertext,
                                                                                  slot width s bits)
    C'  = C * Enc_pk(0)                     (fresh randomness, so the reply says nothing about W beyond the scores)

and returns C'. Re-randomisation matters: without it, a client who knows its own encryption randomness could
read W off the reply's randomness. The Enc_pk(0) factors come from a per-key pool filled ahead of need while the
server is idle (``pool.py``; each factor is handed out once, an empty pool computes one inline). Cost per
request: ~(bits + set bits) modular multiplications per output (``multiexp``), plus one phe encryption of zero
when the pool is empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gmpy2
import numpy as np
import phe
from phe import paillier
from torch import nn

from medhe.errors import CiphertextError, PlanError
from medhe.he.paillier import encoding, wire
from medhe.he.paillier import pool as rerand
from medhe.he.paillier.multiexp import bit_schedule, multi_pow
from medhe.he.scheme import ServerModel
from medhe.he.security import (PAILLIER_DEFAULT_KEY_BITS, PAILLIER_MAX_KEY_BITS, PAILLIER_MIN_KEY_BITS,
                               check_paillier_key_bits, paillier_security_bits)

SCHEME = "paillier"
DEFAULT_KEY_BITS = PAILLIER_DEFAULT_KEY_BITS  # ~128-bit security (NIST SP 800-57 equivalence for factoring keys)
MIN_KEY_BITS = PAILLIER_MIN_KEY_BITS  # 128-bit: the floor medhe accepts at all (2048 bits, ~112, is refused)
MAX_KEY_BITS = PAILLIER_MAX_KEY_BITS  # refuse absurd keys that would turn one request into minutes of work
DEFAULT_FEATURE_BITS = 24
DEFAULT_WEIGHT_BITS = 24
SPEC_FORMAT = "medhe-paillier-spec/1"

check_key_bits = check_paillier_key_bits  # the floor lives in medhe.he.security with the other schemes'


def affine_map(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) in float64 such that model(x) == W x + b, for Linear/BatchNorm1d/Flatten/Identity/Dropout chains."""
    mods = [m for m in model.modules() if not isinstance(m, nn.Sequential)] if isinstance(model, nn.Sequential) \
        else [model]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    for m in mods:
        if isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout)):
            continue
        if isinstance(m, nn.Linear):
            a = m.weight.detach().double().numpy()
            c = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(a.shape[0])
        elif isinstance(m, nn.BatchNorm1d) and m.running_mean is not None:
            scale = (m.weight.detach().double() if m.affine else 1.0) / (m.running_var.double() + m.eps).sqrt()
            shift = (m.bias.detach().double() if m.affine else 0.0) - m.running_mean.double() * scale
            a, c = np.diag(scale.numpy()), shift.numpy()
        else:
            raise PlanError(f"Paillier can only evaluate an affine head (Linear, BatchNorm1d); {type(m).__name__} "
                            "is not affine: move it into the client stage or use --scheme ckks")
        if weight is not None and a.shape[1] != weight.shape[0]:
            raise PlanError(f"the head's layers do not chain ({weight.shape[0]} outputs into {a.shape[1]} inputs)")
        weight, bias = (a, c) if weight is None else (a @ weight, a @ bias + c)
    if weight is None:
        raise PlanError("the server model has no Linear layer: Paillier needs a linear head to evaluate")
    return weight, bias


@dataclass
class PaillierKeys:
    """A client's validated public key, with what the server precomputes once per key."""

    public_key: paillier.PaillierPublicKey
    n: gmpy2.mpz
    n2: gmpy2.mpz
    fingerprint: bytes
    bias_factor: gmpy2.mpz  # (1 + B n) mod n^2 = the unrandomised encryption of the packed biases
    width: int  # bytes per ciphertext
    pool: rerand.RerandomizerPool  # fresh Enc_pk(0) factors for re-randomising replies, each used once


class PaillierServerModel(ServerModel):
    """The private linear head as fixed-point integers, evaluated on ciphertexts under the client's key."""

    scheme = SCHEME

    def __init__(self, weight: np.ndarray, bias: np.ndarray, *, name: str, task: str, labels: list[str],
                 feature_bound: float, key_bits: int = DEFAULT_KEY_BITS, feature_bits: int = DEFAULT_FEATURE_BITS,
                 weight_bits: int = DEFAULT_WEIGHT_BITS, extra_spec: dict[str, Any] | None = None,
                 pool_size: int = rerand.DEFAULT_POOL_SIZE, pool_background: bool = True) -> None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or not 0 <= pool_size <= rerand.MAX_POOLED:
            raise PlanError(f"pool_size must be an integer in 0..{rerand.MAX_POOLED} (default "
                            f"{rerand.DEFAULT_POOL_SIZE}; 0 computes every re-randomisation inline), not {pool_size!r}")
        self.pool_size, self.pool_background = pool_size, bool(pool_background)
        self.key_bits = check_key_bits(key_bits, "Paillier model")
        for label, bits in (("feature_bits", feature_bits), ("weight_bits", weight_bits)):
            if not isinstance(bits, int) or not 8 <= bits <= 64:
                raise PlanError(f"{label} must be an integer in 8..64 (default 24), not {bits!r}")
        if not (isinstance(feature_bound, (int, float)) and math.isfinite(feature_bound) and feature_bound > 0):
            raise PlanError(f"feature_bound must be a positive number, not {feature_bound!r}")
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        if not (np.isfinite(self.weight).all() and np.isfinite(self.bias).all()):
            raise PlanError("the head has non-finite weights: retrain or re-export the model")
        self.num_outputs, self.dim = self.weight.shape
        self.feature_bits, self.weight_bits = feature_bits, weight_bits
        self.feature_bound = float(feature_bound)
        self.name, self.task, self.labels = name, task, list(labels)
        self.extra_spec = dict(extra_spec or {})
        w_int = np.array(encoding.encode(self.weight, weight_bits), dtype=object).reshape(self.weight.shape)
        self._bias_ints = encoding.encode(self.bias, feature_bits + weight_bits)
        self.slot_bits = encoding.slot_bits_for(w_int, self._bias_ints, self.feature_bound, feature_bits)
        if self.slot_bits * self.num_outputs >= MIN_KEY_BITS - 2:
            raise PlanError(f"{self.num_outputs} scores of {self.slot_bits} bits do not fit one Paillier plaintext: "
                            "lower feature_bits/weight_bits or the feature bound")
        # per output: schedules for the positive and the negated negative weights
        self._schedules = [(bit_schedule([max(int(w), 0) for w in row]), bit_schedule([max(-int(w), 0) for w in row]))
                           for row in w_int]
        self._packed_bias = encoding.pack(self._bias_ints, self.slot_bits)

    # -- ServerModel --------------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "format": SPEC_FORMAT,
            "model": self.name,
            "name": self.name,  # pre-0.x name of "model", kept for clients that read it
            "task": self.task,
            "labels": self.labels,
            "output": {"count": self.num_outputs},
            "num_outputs": self.num_outputs,  # pre-0.x name of output.count, kept for clients that read it
            "input": {"kind": "features", "dim": self.dim, "bound": self.feature_bound},
            "params": {
                "library": f"phe {phe.__version__}",
                "key_bits": self.key_bits,
                "min_key_bits": MIN_KEY_BITS,
                "feature_bits": self.feature_bits,
                "weight_bits": self.weight_bits,
                "score_scale": f"2^-{self.feature_bits + self.weight_bits}",
                "slot_bits": self.slot_bits,
                "score_error_bound": self.public_error_bound(),
            },
            **self.extra_spec,
        }

    def report_params(self) -> dict[str, Any]:
        # the server's evaluation is medhe's gmpy2 multi-exponentiation; phe makes the keys and ciphertexts
        return {"backend": "gmpy2", "security_bits": paillier_security_bits(self.key_bits)}

    def load_keys(self, data: bytes) -> PaillierKeys:
        msg = wire.loads(data, wire.KIND_PUBLIC_KEY)
        if len(msg.values) != 1:
            raise CiphertextError("a Paillier public key message holds exactly one modulus: resend the client's key")
        n = msg.values[0]
        if wire.fingerprint(n) != msg.fingerprint:
            raise CiphertextError("Paillier public key does not match its fingerprint: resend the client's key")
        check_key_bits(n.bit_length(), "client key")
        if n % 2 == 0 or gmpy2.is_prime(n, 8):
            raise CiphertextError("the Paillier modulus is not an RSA-type modulus (even or prime): "
                                  "generate keys with a medhe Paillier client")
        if self.slot_bits * self.num_outputs >= n.bit_length() - 2:
            raise CiphertextError(f"a {n.bit_length()}-bit key is too small for {self.num_outputs} packed scores "
                                  f"of {self.slot_bits} bits: use a {self.key_bits}-bit key")
        pk = paillier.PaillierPublicKey(n)
        n_m = gmpy2.mpz(n)
        n2 = n_m * n_m
        bias_factor = (1 + encoding.to_residue(self._packed_bias, n) * n_m) % n2
        pool = rerand.RerandomizerPool(pk, self.pool_size, background=self.pool_background)
        return PaillierKeys(pk, n_m, n2, msg.fingerprint, bias_factor, (2 * n.bit_length() + 7) // 8, pool)

    def infer(self, keys: PaillierKeys, ciphertext: bytes) -> bytes:
        with rerand.busy():  # keeps the background refill of re-randomisation factors off the CPU meanwhile
            return self._infer(keys, ciphertext)

    def _infer(self, keys: PaillierKeys, ciphertext: bytes) -> bytes:
        if not isinstance(keys, PaillierKeys):
            raise CiphertextError("infer() needs the object returned by load_keys(): load the client's key first")
        msg = wire.loads(ciphertext, wire.KIND_FEATURES)
        wire.FRAMING.check_binding(wire.KIND_FEATURES, msg.fingerprint, keys.fingerprint,
                                   "a different Paillier key than the one loaded",
                                   "send the evaluation key of the session that encrypted them")
        if len(msg.values) != self.dim:
            raise CiphertextError(f"expected {self.dim} encrypted features, got {len(msg.values)}: run the model's "
                                  "client stage (feature extractor) before encrypting")
        if msg.scale != self.feature_bits:
            raise CiphertextError(f"features were encoded at 2^-{msg.scale}, this model expects "
                                  f"2^-{self.feature_bits}: use the spec of this server")
        n, n2 = keys.n, keys.n2
        cts = [gmpy2.mpz(c) for c in msg.values]
        for i, c in enumerate(cts):
            if not 0 < c < n2 or gmpy2.gcd(c, n) != 1:
                raise CiphertextError(f"encrypted feature {i} is not a valid Paillier ciphertext for this key "
                                      "(tampered or corrupted): re-encrypt the features")
        packed = None
        for pos, neg in reversed(self._schedules):
            a = multi_pow(cts, pos, n2)
            if neg:
                a = a * gmpy2.invert(multi_pow(cts, neg, n2), n2) % n2
            packed = a if packed is None else gmpy2.powmod(packed, 1 << self.slot_bits, n2) * a % n2
        assert packed is not None
        packed = packed * keys.bias_factor % n2
        fresh = keys.pool.take()  # Enc(0) = r^n from phe (SystemRandom), removed from the pool: never reused
        out = packed * fresh % n2
        reply = wire.Message(wire.KIND_SCORES, keys.fingerprint, [int(out)], scale=self.feature_bits + self.weight_bits,
                             slot_bits=self.slot_bits, slots=self.num_outputs)
        return wire.dumps(reply, keys.width)

    # -- error bound ---------------------------------------------------------------------------------------------
    def error_bound(self, features: np.ndarray) -> np.ndarray:
        """Per-image, per-output bound on |decrypted score - (W x + b)| for known features (N, d) or (d,)."""
        x = np.asarray(features, dtype=np.float64)
        return encoding.error_bound(self.weight, np.abs(x).sum(axis=-1), self.feature_bits, self.weight_bits)

    def public_error_bound(self) -> float:
        """Worst-case bound over all admissible inputs (|x_i| <= bound), with ||w_j||_1 rounded up to a power of
        two so the published number reveals only the magnitude of the weights."""
        l1 = float(np.abs(self.weight).sum(axis=1).max())
        l1_pow2 = 2.0 ** math.ceil(math.log2(l1)) if l1 > 0 else 0.0
        fx, fw, d = self.feature_bits, self.weight_bits, self.dim
        bound = (l1_pow2 * 2.0 ** -(fx + 1) + d * self.feature_bound * 2.0 ** -(fw + 1) + d * 2.0 ** -(fx + fw + 2)
                 + 2.0 ** -(fx + fw + 1))
        return float(bound)

    def plain_scores(self, features: np.ndarray) -> np.ndarray:
        """W x + b in float64, the exact reference the encrypted scores are bounded against."""
        return np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias


def compile_paillier(artifact: Any, key_bits: int | None = None, feature_bits: int = DEFAULT_FEATURE_BITS,
                     weight_bits: int = DEFAULT_WEIGHT_BITS, feature_bound: float | None = None,
                     pool_size: int = rerand.DEFAULT_POOL_SIZE, **opts: Any) -> PaillierServerModel:
    """Plan a loaded ``ModelArtifact`` whose server model is a linear head over the client stage's features."""
    if opts:
        raise PlanError(f"unknown Paillier option(s) {', '.join(sorted(opts))}: use key_bits, feature_bits, "
                        "weight_bits, feature_bound or pool_size")
    card = artifact.card
    scheme_opts = card.get("scheme_options") or {}
    key_bits = DEFAULT_KEY_BITS if key_bits is None else key_bits
    check_key_bits(key_bits, "Paillier model")
    if feature_bound is None:
        feature_bound = scheme_opts.get("feature_bound")
    if feature_bound is None:
        raise PlanError(f"{artifact.name}: the card does not say how large the features can get; add "
                        "scheme_options.feature_bound (largest |feature| on the training set) to its card.json")
    weight, bias = affine_map(artifact.model)
    stage = card.get("client_stage") or None
    extra = {"preprocessing": card.get("preprocessing"), "client_stage": stage}
    return PaillierServerModel(weight, bias, name=artifact.name, task=artifact.task, labels=artifact.labels,
                               feature_bound=float(feature_bound), key_bits=key_bits, feature_bits=feature_bits,
                               weight_bits=weight_bits, extra_spec=extra, pool_size=pool_size)
