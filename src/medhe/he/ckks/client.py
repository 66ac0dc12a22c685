"""Client side: key generation, input layout + symmetric encryption, decryption, softmax/sigmoid.

Everything the client needs comes from the server's public spec: the parameters, the gather map saying which
input element goes into which slot of which ciphertext, the rotation steps to make keys for, and the output slots.
The secret key never leaves this object.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medhe.errors import CiphertextError, DataError, OutOfRangeError, PlanError
from medhe.he.ckks.wire import envelope
from medhe.he.ckks.backends.seal import SealBackend
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.ckks.compiler.program import decode_gather
from medhe.he.scheme import ClientSession


def _key_levels(levels: Any, steps: list[int], top: int) -> dict[str, Any] | None:
    """The spec's per-key levels, checked (absent in older specs: the keys are then sent whole)."""
    if levels is None:
        return None
    if not isinstance(levels, dict) or not isinstance(levels.get("galois"), dict):
        raise ValueError("key_levels must be an object with a 'galois' object")
    galois = {int(step): int(level) for step, level in levels["galois"].items()}
    relin = int(levels["relin"])
    if not all(0 <= lv <= top for lv in galois.values()) or not -1 <= relin <= top:
        raise ValueError("key_levels lie outside the modulus chain")
    return {"galois": {s: lv for s, lv in galois.items() if s in steps}, "relin": relin}  # others: sent whole


class CKKSClient(ClientSession):
    scheme = "ckks"

    def __init__(self, spec: dict[str, Any]) -> None:
        if not isinstance(spec, dict) or spec.get("scheme") != "ckks":
            raise PlanError("this is not a CKKS spec (scheme != 'ckks'): fetch the spec from a CKKS server")
        try:
            self.params = CKKSParams.from_dict(spec["params"])
            self.plan_id = str(spec["plan_id"])
            self.input_shape = tuple(int(s) for s in spec["input"]["shape"])
            self.input_level = int(spec["input"]["level"])
            self.input_scale = float(spec["input"]["scale"])
            self.rotation_steps = [int(s) for s in spec["rotation_steps"]]
            self.relinearization = bool(spec["relinearization"])
            self.key_levels = _key_levels(spec.get("key_levels"), self.rotation_steps, self.input_level)
            self.output_slots = np.asarray(spec["output"]["slots"], dtype=np.int64)
            self.output_level = int(spec["output"]["level"])
            bound = spec["output"].get("bound")
            self.output_bound = None if bound is None else float(bound)
            self.task = str(spec.get("task", "multi-class"))
            self.labels = list(spec.get("labels") or [])
            self.backend = SealBackend(self.params)
            self.gather = decode_gather(spec, self.backend.slots)
            self.input_complex = bool(spec["input"].get("complex", False))
            self.batch = int(spec["input"].get("batch", 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"the CKKS spec is incomplete or malformed ({exc}); fetch it again from the server") from None
        if self.batch != 1:
            raise PlanError(f"the CKKS spec packs {self.batch} images per ciphertext; this client encrypts one "
                            "image at a time: update medhe")
        if self.gather.max(initial=-1) >= int(np.prod(self.input_shape)):
            raise PlanError("the CKKS spec's input layout points outside the input; fetch the spec again")
        envelope_version = int((spec.get("key_envelope") or {}).get("version", envelope.KEY_ENVELOPE_SEAL))
        if envelope_version != (envelope.KEY_ENVELOPE_HYBRID if self.params.hybrid else envelope.KEY_ENVELOPE_SEAL):
            raise PlanError(f"the CKKS spec announces key envelope version {envelope_version}, which this medhe "
                            "does not make for these parameters: update medhe")
        self._spec = spec
        self._hybrid = None  # hybrid.keygen.HybridKeyGenerator for hybrid chains
        self._keyed = False

    def keygen(self) -> None:
        if self.params.hybrid:  # the secret is SEAL's, sampled in the key context; SEAL encrypts with it here
            from medhe.he.ckks.hybrid.keygen import HybridKeyGenerator

            self._hybrid = HybridKeyGenerator(self.params.layout())
            self.backend.use_secret_key(self._hybrid.secret_key)
        else:
            self.backend.keygen(self.rotation_steps, self.relinearization)
        self._keyed = True

    def _need_keys(self) -> None:
        if not self._keyed:
            raise PlanError("no keys yet: call keygen() before evaluation_keys(), encrypt() or decrypt()")

    def evaluation_keys(self) -> bytes:
        """Serialized on each call and not kept: callers send them once (up to ~0.5 GB for latent models), and the
        service SDK and ``run_encrypted`` drop them as soon as the server holds them. Each call draws fresh seeds."""
        self._need_keys()
        if self._hybrid is not None:  # key envelope version 2
            from medhe.he.ckks.hybrid import wire

            return self._hybrid.evaluation_keys(self.plan_id, wire.needed(self._spec, self.backend.galois_element))
        galois, relin = self.backend.evaluation_key_bytes(self.key_levels)
        return envelope.pack(envelope.KIND_KEYS, self.plan_id, [galois, relin])

    def layout(self, x: np.ndarray) -> np.ndarray:
        """The slot vectors to encrypt (ciphertexts x slots): the public gather map applied to ``x``."""
        x = np.asarray(x, dtype=np.float64)
        if x.size != int(np.prod(self.input_shape)):
            raise DataError(f"input has shape {x.shape}, this model expects {self.input_shape}: "
                            "preprocess it as the model card says")
        if not np.all(np.isfinite(x)):
            raise DataError("input contains NaN or infinite values: check the image and preprocessing")
        flat = np.append(x.reshape(-1), 0.0)  # index -1 reads the appended zero
        rows = flat[self.gather]
        if self.input_complex:  # two taps per slot: rows 2k (real part) and 2k+1 (imaginary part)
            return rows[0::2] + 1j * rows[1::2]
        return rows

    def encrypt(self, x: np.ndarray) -> bytes:
        self._need_keys()
        be = self.backend
        parts = [be.encrypt_bytes(be.encode(vec, self.input_level, self.input_scale)) for vec in self.layout(x)]
        return envelope.pack(envelope.KIND_INPUT, self.plan_id, parts)

    def decrypt(self, data: bytes) -> np.ndarray:
        self._need_keys()
        parts = envelope.unpack(data, envelope.KIND_OUTPUT, self.plan_id)
        if len(parts) != 1:
            raise CiphertextError(f"encrypted result must hold 1 ciphertext, got {len(parts)}")
        ct = self.backend.load_ciphertext(parts[0])
        if self.backend.level(ct) != self.output_level:
            raise CiphertextError(f"encrypted result is at level {self.backend.level(ct)}, expected "
                                  f"{self.output_level}: it was not produced by this server's plan")
        out = self.backend.decrypt(ct)[self.output_slots]
        peak = float(np.max(np.abs(out))) if out.size else 0.0
        if self.output_bound is not None and not peak <= self.output_bound:
            # CKKS results live modulo the first prime: far outside the range the plan was sized for, a result may
            # have wrapped around and look like an ordinary one. Real images stay well inside (the bound is a
            # 4-sigma estimate from the training data's activation ranges); say so rather than report garbage.
            raise OutOfRangeError(f"the decrypted scores reach |{peak:.4g}|, beyond the ±{self.output_bound:.4g} "
                                  "this model's encrypted plan is sized for: the input is far from what the model "
                                  "was trained on (not a radiograph of the expected kind, or crafted), so the "
                                  "encrypted result may have wrapped around; no diagnosis is given")
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Sigmoid for multi-label tasks, softmax otherwise (computed here: decryptions stay with the client)."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.task == "multi-label":
            return 1.0 / (1.0 + np.exp(-logits))
        z = np.exp(logits - logits.max())
        return z / z.sum()
