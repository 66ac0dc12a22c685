"""Server side: holds the compiled plan and its plaintext weights, evaluates with the client's public keys only.

The backend that runs the program (``backends``: ``seal``, ``native``, or ``auto``) is chosen by the caller;
``server.backend.name`` says which one ran. Keys, inputs and outputs are SEAL's bytes whatever the backend.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from medhe.errors import CiphertextError, PlanError
from medhe.he.ckks.backends import get_backend
from medhe.he.ckks.backends.base import Backend
from medhe.he.ckks.compiler.driver import compile_plan
from medhe.he.ckks.compiler.program import Plan
from medhe.he.ckks.runtime import PLAINTEXT_CACHE_BYTES, EncodedPlains, run_program
from medhe.he.ckks.wire import envelope
from medhe.he.scheme import ServerModel
from medhe.he.security import security_bits

SCHEME = "ckks"
SPEC_FORMAT = "medhe-ckks-spec/1"


def _seal_library() -> str:
    """Keys and ciphertexts are SEAL's whatever backend evaluates: name the binding and its version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"SEAL (seal-python {version('seal-python')})"
    except PackageNotFoundError:
        return "SEAL (seal-python)"


@dataclass
class CKKSKeys:
    """A client's validated evaluation keys (Galois keys for exactly the plan's steps, relinearization keys)."""

    galois: Any
    relin: Any
    nbytes: int


class CKKSServerModel(ServerModel):
    """A compiled CKKS model: plan + encoded weights. Never holds a secret key."""

    scheme = SCHEME

    def __init__(self, plan: Plan, task: str = "multi-class", labels: list[str] | None = None,
                 name: str = "model", backend: str | Backend | None = None) -> None:
        self.plan = plan
        self.task = task
        self.labels = list(labels) if labels else [str(i) for i in range(plan.output_count)]
        self.name = name
        self.backend = get_backend(backend, plan.params)  # None: "auto" (native when built, else seal)
        if plan.params.hybrid and self.backend.name != "native":
            raise PlanError("this plan uses hybrid key switching, which only medhe's native runtime evaluates: "
                            "build the runtime (make install) or compile with key_switching='seal'")
        self.plains = EncodedPlains(self.backend, plan, PLAINTEXT_CACHE_BYTES)
        # backends that run a whole plan in one call (native) compile it once here
        self._program = self.backend.compile(plan, self.plains) if hasattr(self.backend, "compile") else None
        self._public = plan.public()
        self._lock = threading.Lock()

    @property
    def plan_id(self) -> str:
        return self._public["plan_id"]

    def report_params(self) -> dict[str, Any]:
        params = self.plan.params
        out = {"library": _seal_library(), "backend": self.backend.name,
               "security_bits": security_bits(params.poly_degree, params.prime_bits)}  # special primes counted
        if params.hybrid:
            out["key_switching"] = {"format": "hybrid", "special_primes": params.specials, "alpha": params.alpha,
                                    "dnum": params.layout().dnum}
        return out

    def spec(self) -> dict[str, Any]:
        return {"scheme": SCHEME, "format": SPEC_FORMAT, "model": self.name, "task": self.task,
                "labels": self.labels, **self._public}

    def load_keys(self, data: bytes) -> CKKSKeys:
        if self.plan.params.hybrid:
            return self._load_hybrid_keys(data)
        parts = envelope.unpack(data, envelope.KIND_KEYS, self.plan_id)
        if len(parts) != 2:
            raise CiphertextError(f"evaluation keys must have 2 parts (Galois, relinearization), got {len(parts)}")
        probe = self.backend.fresh()
        probe.load_evaluation_keys(parts[0], parts[1], self._public["key_levels"])
        missing = [s for s in self.plan.rotation_steps if not probe.has_rotation(s)]
        if missing:
            raise CiphertextError(f"evaluation keys lack rotations {missing[:5]}: create them with this server's spec")
        if self.plan.needs_relin and not probe.has_relinearization():
            raise CiphertextError("evaluation keys lack relinearization keys: create them with this server's spec")
        return CKKSKeys(probe.galois_keys, probe.relin_keys, len(data))

    def _load_hybrid_keys(self, data: bytes) -> CKKSKeys:
        """Key envelope version 2: every key the plan uses, sent for at least the levels it is used at."""
        from medhe.he.ckks.hybrid import wire
        from medhe.he.ckks.hybrid.keys import native_keys

        from medhe.he.ckks.hybrid.planner import digits_at

        layout = self.plan.params.layout()
        need = wire.needed(self._public, self.backend.galois_element)
        found = wire.unpack_keys(data, self.plan_id, layout.alpha, need)
        # keep the digits the plan reads, no more: a key sent for higher levels than it is used at would hold
        # memory the server's key accounting (a function of the spec, service.limits) does not count
        found = {e: (need[e], frames[:digits_at(need[e], layout.alpha)]) for e, (_, frames) in found.items()
                 if e in need}
        relin = found.pop(wire.RELIN, None)
        keys = native_keys(self.backend.ctx, layout, found, relin if self.plan.needs_relin else None)
        return CKKSKeys(keys, keys if keys.has_relin else None, len(data))

    def load_inputs(self, ciphertext: bytes) -> list[Any]:
        parts = envelope.unpack(ciphertext, envelope.KIND_INPUT, self.plan_id)
        expected = self.plan.input_ciphertexts
        if len(parts) != expected:
            raise CiphertextError(f"encrypted input has {len(parts)} ciphertexts, this model expects {expected}: "
                                  "encrypt with a client built from this server's spec")
        cts = [self.backend.load_ciphertext(p) for p in parts]
        for ct in cts:
            if self.backend.level(ct) != self.plan.input_level:
                raise CiphertextError(f"input ciphertext is at level {self.backend.level(ct)}, expected "
                                      f"{self.plan.input_level}: encrypt with this server's spec")
            if not math.isclose(self.backend.scale(ct), self.plan.input_scale, rel_tol=1e-9):
                raise CiphertextError(f"input ciphertext has scale 2^{math.log2(self.backend.scale(ct)):.2f}, "
                                      f"expected 2^{math.log2(self.plan.input_scale):.2f}: encrypt with this "
                                      "server's spec")
        return cts

    def infer(self, keys: CKKSKeys, ciphertext: bytes) -> bytes:
        if not isinstance(keys, CKKSKeys):
            raise CiphertextError("keys must come from load_keys() of this server model")
        cts = self.load_inputs(ciphertext)
        out = self.evaluate(keys, cts)
        return envelope.pack(envelope.KIND_OUTPUT, self.plan_id, [self.backend.serialize(out)])

    def evaluate(self, keys: CKKSKeys, cts: list[Any], hook: Callable[[int, Any], None] | None = None) -> Any:
        if self._program is not None:  # one native call, GIL released, no shared mutable state: no lock
            return self._program.evaluate(keys.galois, cts, hook)
        with self._lock:
            self.backend.galois_keys, self.backend.relin_keys = keys.galois, keys.relin
            try:
                return run_program(self.plan, self.backend, self.plains, cts, hook)
            except (ValueError, RuntimeError) as exc:
                raise CiphertextError(f"the {self.backend.name} backend refused to evaluate the input ({exc}): "
                                      "encrypt and create keys with this server's spec") from None
            finally:
                self.backend.galois_keys = self.backend.relin_keys = None


def input_shape_of(artifact: Any) -> tuple[int, ...]:
    """The CKKS input shape: the preprocessed image, or the output of the public client network."""
    pre = artifact.card.get("preprocessing") or {}
    try:
        shape = (int(pre.get("channels", 1)), int(pre["size"]), int(pre["size"]))
    except (KeyError, TypeError, ValueError):
        raise PlanError("the model card's preprocessing lacks 'size' (and 'channels'); re-export the model") from None
    if artifact.client_model is not None:
        with torch.no_grad():
            shape = tuple(artifact.client_model(torch.zeros(1, *shape)).shape[1:])
    return shape


def compile_ckks(artifact: Any, backend: str | Backend | None = "auto", **options: Any) -> CKKSServerModel:
    """Compile a loaded ``ModelArtifact`` for CKKS (options: see ``compile_plan``; card scheme_options apply) and
    serve it on ``backend`` (a ``backends`` registry name, or a ``Backend`` instance)."""
    card = artifact.card
    merged = {**((card.get("scheme_options") or {}).get("ckks") or {}), **options}
    plan = compile_plan(artifact.model, input_shape_of(artifact), card.get("activation_ranges"), **merged)
    return CKKSServerModel(plan, task=card.get("task", "multi-class"), labels=card.get("labels"),
                           name=card.get("name", "model"), backend=backend)


def server_from_model(model: torch.nn.Module, input_shape: tuple[int, ...], task: str = "multi-class",
                      labels: list[str] | None = None, activation_ranges: dict | None = None,
                      backend: str | Backend | None = "auto", **options: Any) -> CKKSServerModel:
    """Bring-your-own torch model: compile and wrap in one call."""
    plan = compile_plan(model, input_shape, activation_ranges, **options)
    return CKKSServerModel(plan, task=task, labels=labels, backend=backend)


__all__ = ["CKKSServerModel", "CKKSKeys", "compile_ckks", "server_from_model", "input_shape_of"]
