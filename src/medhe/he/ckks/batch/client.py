"""Client side of batch mode: relinearization keys only, one ciphertext per input element holding one image per
slot, and decryption back to (images, outputs). The secret key never leaves this object."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from medhe.errors import CiphertextError, DataError, OutOfRangeError, PlanError
from medhe.he.ckks.backends.seal import SealBackend
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.ckks.wire import envelope as wire
from medhe.he.ckks.wire import serialize


class CKKSBatchClient:
    scheme = "ckks"

    def __init__(self, spec: dict[str, Any]) -> None:
        if not isinstance(spec, dict) or spec.get("scheme") != "ckks" or spec.get("mode") != "batch":
            raise PlanError("this is not a CKKS batch spec: fetch the batch spec from the server")
        try:
            self.params = CKKSParams.from_dict(spec["params"])
            self.plan_id = str(spec["plan_id"])
            self.batch = int(spec["batch"])
            self.input_shape = tuple(int(s) for s in spec["input"]["shape"])
            self.input_level = int(spec["input"]["level"])
            self.input_scale = float(spec["input"]["scale"])
            self.input_count = int(spec["input"]["ciphertexts"])
            self.output_count = int(spec["output"]["count"])
            self.output_level = int(spec["output"]["level"])
            self.output_bound = float(spec["output"]["bound"])
            self.input_bound = float(spec["input"]["bound"])
            self.relin_level = int(spec["key_levels"]["relin"])
            self.task = str(spec.get("task", "multi-class"))
            self.labels = list(spec.get("labels") or [])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"the CKKS batch spec is incomplete or malformed ({exc}); fetch it again") from None
        self.backend = SealBackend(self.params)
        if self.batch != self.backend.slots or self.input_count != int(np.prod(self.input_shape)):
            raise PlanError("the CKKS batch spec does not match its parameters; fetch it again from the server")
        self._keyed = False

    def keygen(self) -> None:
        self.backend.keygen([], True)
        self._keyed = True

    def _need_keys(self) -> None:
        if not self._keyed:
            raise PlanError("no keys yet: call keygen() before evaluation_keys(), encrypt_batch() or decrypt_batch()")

    def evaluation_keys(self) -> bytes:
        """Relinearization keys only (no Galois keys: a batch plan never rotates), seeded and level-trimmed."""
        self._need_keys()
        be = self.backend
        keep = {serialize.RELIN_KEY_INDEX: self.relin_level}
        relin = serialize.dump_relin_keys(be.relin_keys, be.context, be._seeder, keep)
        return wire.pack(wire.KIND_KEYS, self.plan_id, [relin])

    def batches(self, n: int) -> int:
        return -(-int(n) // self.batch)

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        size = int(np.prod(self.input_shape))
        if x.ndim < 1 or x.size != x.shape[0] * size or x.shape[0] < 1:
            raise DataError(f"images have shape {x.shape}, this model expects (n, {', '.join(map(str, self.input_shape))}):"
                            " preprocess them as the model card says")
        x = x.reshape(x.shape[0], size)
        bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
        if bad.size:
            raise DataError(f"image {int(bad[0])} contains NaN or infinite values: check it and its preprocessing")
        # One image far outside the range the plan was sized for can wrap the shared ciphertext modulo Q and spoil
        # every image of its batch, so inputs beyond the plan's bound are refused here, before encryption.
        bad = np.flatnonzero(np.abs(x).max(axis=1) > self.input_bound * (1 + 1e-6))
        if bad.size:
            raise DataError(f"image {int(bad[0])} has values up to {np.abs(x[bad[0]]).max():.4g}, beyond the "
                            f"±{self.input_bound:g} this model's batch plan accepts: preprocess it as the model "
                            "card says")
        return x

    def iter_encrypt(self, x: np.ndarray) -> Iterator[bytes]:
        """One encrypted batch at a time (each ~``batch`` images; the last padded with zeros)."""
        self._need_keys()
        x = self._check(x)
        be = self.backend
        for start in range(0, x.shape[0], self.batch):
            block = x[start:start + self.batch]
            cols = np.zeros((x.shape[1], self.batch))
            cols[:, : block.shape[0]] = block.T
            parts = [be.encrypt_bytes(be.encode(cols[i], self.input_level, self.input_scale))
                     for i in range(cols.shape[0])]
            yield wire.pack(wire.KIND_INPUT, self.plan_id, parts)

    def encrypt_batch(self, x: np.ndarray) -> list[bytes]:
        """Any number of images (n, *input shape) -> one message per ciphertext batch."""
        return list(self.iter_encrypt(x))

    def decrypt_one(self, data: bytes) -> np.ndarray:
        """(batch, outputs) scores of one encrypted result."""
        self._need_keys()
        parts = wire.unpack(data, wire.KIND_OUTPUT, self.plan_id)
        if len(parts) != self.output_count:
            raise CiphertextError(f"encrypted batch result must hold {self.output_count} ciphertexts, got "
                                  f"{len(parts)}")
        cols = []
        for part in parts:
            ct = self.backend.load_ciphertext(part)
            if self.backend.level(ct) != self.output_level:
                raise CiphertextError(f"encrypted batch result is at level {self.backend.level(ct)}, expected "
                                      f"{self.output_level}: it was not produced by this server's batch plan")
            cols.append(self.backend.decrypt(ct))
        out = np.stack(cols, axis=1)
        bad = np.flatnonzero(~(np.abs(out) <= self.output_bound).all(axis=1))
        if bad.size:
            # All images share the ciphertexts: a value that wrapped around modulo Q spoils every slot, so no
            # score of this batch can be trusted (see CKKSClient.decrypt for the single-image case).
            raise OutOfRangeError(f"decrypted scores of {bad.size} slot(s) (first: {int(bad[0])}) lie beyond the "
                                  f"±{self.output_bound:.4g} this model's batch plan is sized for, so the encrypted "
                                  "batch may have wrapped around and none of its results is given: an image far "
                                  "from the training data is in it; run its images one at a time to find it")
        return out

    def decrypt_batch(self, results: Iterable[bytes], n: int | None = None) -> np.ndarray:
        """(n, outputs) scores for the first ``n`` images (default: every slot of every batch)."""
        out = np.concatenate([self.decrypt_one(r) for r in results], axis=0)
        if n is not None:
            if n > out.shape[0]:
                raise DataError(f"asked for {n} results, the encrypted batches hold {out.shape[0]}")
            out = out[:n]
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        if self.task == "multi-label":
            return 1.0 / (1.0 + np.exp(-logits))
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


__all__ = ["CKKSBatchClient"]
