"""The TFHE client: pools and quantizes the image (public preprocessing), encrypts, and dequantizes the result.

The secret key never leaves this object; ``evaluation_keys()`` returns only Concrete's evaluation keys
(bootstrap + key-switching keys), framed with the circuit's fingerprint.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from medhe.errors import CiphertextError, DataError, PlanError
from medhe.he.scheme import ClientSession
from medhe.he.tfhe import wire
from medhe.he.tfhe.circuit import fhe
from medhe.he.tfhe.server import SPEC_FORMAT

#: Inputs may exceed the quantized range by float rounding only; anything more is a preprocessing mistake.
RANGE_TOLERANCE = 1e-3


class TFHEClient(ClientSession):
    scheme = "tfhe"

    def __init__(self, spec: dict[str, Any]) -> None:
        if not isinstance(spec, dict) or spec.get("scheme") != "tfhe" or spec.get("format") != SPEC_FORMAT:
            raise PlanError(f"not a TFHE spec of format {SPEC_FORMAT!r}: fetch the spec from a medhe TFHE server")
        try:
            raw = base64.b64decode(spec["client_specs"], validate=True)
            self._specs = fhe.ClientSpecs.deserialize(raw)
            self.fingerprint = bytes.fromhex(spec["fingerprint"])
            inp, out = spec["input"], spec["output"]
            self.shape = tuple(int(v) for v in inp["shape"])
            self.pool, self.bits = int(inp["pool"]), int(inp["bits"])
            self.lo, self.hi = (float(v) for v in inp["range"])
            self.output_scale = float(out["scale"])
        except (KeyError, TypeError, ValueError, binascii.Error, RuntimeError) as exc:
            raise PlanError(f"TFHE spec is incomplete or corrupted ({exc}); fetch it again from the server") from None
        if wire.fingerprint(raw) != self.fingerprint:
            raise PlanError("TFHE spec's client specs do not match its fingerprint; fetch the spec again")
        self.spec = spec
        self._client = fhe.Client(self._specs)

    # -- keys ---------------------------------------------------------------------------------------------------
    def keygen(self, seed: int | None = None) -> None:
        """Fresh secret and evaluation keys (``seed`` only for reproducible tests; never in production)."""
        self._client.keys.generate(force=True, secret_seed=seed, encryption_seed=seed)

    def _keys_ready(self) -> None:
        if not self._client.keys.are_generated:
            raise CiphertextError("no TFHE keys yet: call keygen() first")

    def evaluation_keys(self) -> bytes:
        self._keys_ready()
        return wire.pack(wire.KIND_KEYS, self.fingerprint, self._client.evaluation_keys.serialize())

    # -- data ---------------------------------------------------------------------------------------------------
    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float (C, H, W) preprocessed image -> int64 vector the circuit takes (public pooling + quantization)."""
        x = np.asarray(x)
        if x.shape != self.shape:
            raise DataError(f"TFHE input has shape {x.shape} but the model takes {self.shape}; "
                            "apply the model's preprocessing (card 'preprocessing') to one image")
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"TFHE input must be numbers, got dtype {x.dtype}")
        x = x.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise DataError("TFHE input contains NaN or infinity; check the image and its preprocessing")
        lo, hi = float(x.min()), float(x.max())
        if lo < self.lo - RANGE_TOLERANCE or hi > self.hi + RANGE_TOLERANCE:
            raise DataError(f"TFHE input spans [{lo:.3g}, {hi:.3g}] but the model was quantized for "
                            f"[{self.lo:g}, {self.hi:g}]; apply the model's preprocessing (card 'preprocessing')")
        c, h, w = self.shape
        p = self.pool
        if p > 1:
            x = x[:, : h // p * p, : w // p * p].reshape(c, h // p, p, w // p, p).mean(axis=(2, 4))
        levels = 2 ** self.bits - 1
        q = np.round((x.reshape(-1) - self.lo) / ((self.hi - self.lo) / levels))
        return np.clip(q, 0, levels).astype(np.int64)

    def encrypt(self, x: np.ndarray) -> bytes:
        q = self.quantize(x)
        self._keys_ready()
        return self.encrypt_quantized(q)

    def encrypt_quantized(self, q: np.ndarray) -> bytes:
        self._keys_ready()
        value = self._client.encrypt(np.asarray(q, dtype=np.int64))
        return wire.pack(wire.KIND_INPUT, self.fingerprint, value.serialize())

    def decrypt_raw(self, data: bytes) -> np.ndarray:
        """The output accumulators as integers (what simulation returns)."""
        self._keys_ready()
        payload = wire.unpack(data, wire.KIND_OUTPUT, self.fingerprint)
        try:
            out = self._client.decrypt(fhe.Value.deserialize(payload))
        except Exception as exc:
            raise CiphertextError(f"TFHE output does not decrypt ({str(exc).splitlines()[0][:120]}); "
                                  "it was not made for this client's keys") from None
        return np.asarray(out, dtype=np.int64).reshape(-1)

    def decrypt(self, data: bytes) -> np.ndarray:
        return self.decrypt_raw(data).astype(np.float64) * self.output_scale
