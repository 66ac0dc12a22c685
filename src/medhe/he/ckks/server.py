"""Server side: holds the compiled plan and its plaintext weights, evaluates with the client's public keys only.

``run_program`` is the interpreter of a plan on any ``Backend``; the debug helper reuses it with a hook that sees
every register.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from medhe.errors import CiphertextError, PlanError
from medhe.he.ckks import wire
from medhe.he.ckks.backend import Backend, SealBackend
from medhe.he.ckks.plan import Plan, compile_plan
from medhe.he.scheme import ServerModel

SCHEME = "ckks"
SPEC_FORMAT = "medhe-ckks-spec/1"


def run_program(plan: Plan, be: Backend, plains: list[Any], inputs: list[Any],
                hook: Callable[[int, Any], None] | None = None) -> Any:
    """Evaluate ``plan`` on encrypted ``inputs`` (one per input ciphertext); returns the output ciphertext."""
    regs: dict[int, Any] = dict(zip(range(len(inputs)), inputs))
    w = _Weights(be, plains)
    for ins in plan.instrs:
        if ins.op == "linear":
            out = _linear(be, ins, [regs[s] for s in ins.srcs], w, plan.key_path)
        elif ins.op == "poly2":
            u = regs[ins.srcs[0]]
            v = w.add(be.negate(u) if ins.sign < 0 else u, ins.consts["beta"])
            out = be.rescale(be.relinearize(be.multiply(u, v)))
            if "c" in ins.consts:
                out = w.add(out, ins.consts["c"])
        elif ins.op == "poly3":
            u = regs[ins.srcs[0]]
            t = w.add(u, ins.consts["th"])
            w2 = be.rescale(be.relinearize(be.multiply(t, t)))
            z = w.add(w2, ins.consts["kz"])
            out = be.rescale(be.relinearize(be.multiply(z, be.mod_switch(u, be.level(z)))))
            if ins.sign < 0:
                out = be.negate(out)
            if "c" in ins.consts:
                out = w.add(out, ins.consts["c"])
        elif ins.op == "gate3":
            x, u = regs[ins.srcs[0]], regs[ins.srcs[1]]
            level = be.level(u)
            xp = be.rescale(be.relinearize(be.multiply(be.mod_switch(x, level), u)))
            t = w.add(u, ins.consts["th"])
            z = w.add(be.rescale(be.relinearize(be.multiply(t, t))), ins.consts["kz"])
            out = be.rescale(be.relinearize(be.multiply(xp, z)))
            if ins.sign < 0:
                out = be.negate(out)
            if "c" in ins.consts:
                be.add_inplace(out, be.rescale(w.relin(w.mul(be.mod_switch(x, level - 1), ins.consts["c"]))))
        elif ins.op in ("mul", "add"):
            a, b = regs[ins.srcs[0]], regs[ins.srcs[1]]
            level = min(be.level(a), be.level(b))
            a, b = be.mod_switch(a, level), be.mod_switch(b, level)
            out = be.add(a, b) if ins.op == "add" else be.rescale(be.relinearize(be.multiply(a, b)))
        else:  # pragma: no cover
            raise PlanError(f"unknown CKKS instruction {ins.op!r}")
        regs[ins.dst] = out
        if hook is not None:
            hook(ins.dst, out)
    return regs[plan.output_register]


def _rotate(be: Backend, ct: Any, step: int, key_path: Callable[[int], list[int]]) -> Any:
    for key_step in key_path(step):
        ct = be.rotate(ct, key_step)
    return ct


class _Weights:
    """The plan's weight operands: plaintexts (the default), or ciphertexts under the client's key when the
    container says ``encrypted`` (P3's encrypted model). Then products are ciphertext x ciphertext and are
    relinearized once per accumulated sum, before its rescale or rotation."""

    def __init__(self, be: Backend, plains: Any) -> None:
        self.be, self.plains = be, plains
        self.encrypted = bool(getattr(plains, "encrypted", False))

    def mul(self, ct: Any, index: int) -> Any:
        if self.encrypted:
            return self.be.multiply(ct, self.plains[index])
        return self.be.multiply_plain(ct, self.plains[index])

    def add(self, ct: Any, index: int) -> Any:
        if self.encrypted:
            return self.be.add(ct, self.plains[index])
        return self.be.add_plain(ct, self.plains[index])

    def relin(self, ct: Any) -> Any:
        return self.be.relinearize(ct) if self.encrypted else ct


def _linear(be: Backend, ins, xs: list[Any], w: _Weights, key_path: Callable[[int], list[int]]) -> Any:
    rotated = {0: xs[0]}
    if len(xs) == 1:
        for b in ins.babies:
            if b:
                rotated[b] = _rotate(be, xs[0], b, key_path)
    total = None
    for giant, terms in ins.groups:
        acc = None
        for src, baby, pt in terms:
            prod = w.mul(xs[src] if len(xs) > 1 else rotated[baby], pt)
            if acc is None:
                acc = prod
            else:
                be.add_inplace(acc, prod)
        acc = be.rescale(w.relin(acc))
        if giant:
            acc = _rotate(be, acc, giant, key_path)
        if total is None:
            total = acc
        else:
            be.add_inplace(total, acc)
    for step in ins.reduce:
        be.add_inplace(total, _rotate(be, total, step, key_path))
    if ins.conjugate:  # real part of a complex-packed product (the weights carry the 1/2)
        be.add_inplace(total, be.conjugate(total))
    if "bias" in ins.consts:
        total = w.add(total, ins.consts["bias"])
    return total


PLAINTEXT_CACHE_BYTES = 1 << 30  # encoded weights kept in memory; beyond this they are encoded on use


class EncodedPlains:
    """The plan's plaintexts, encoded once while they fit the memory budget, otherwise encoded on each use.

    Deep multi-channel models can have thousands of diagonals (a GB or more encoded): a shared server must not
    be pushed out of memory by one model, at the price of slower evaluation for such models.
    """

    def __init__(self, backend: SealBackend, plan: Plan, budget_bytes: int) -> None:
        self.backend = backend
        self.specs = plan.plains
        n = plan.params.poly_degree
        self.cache: dict[int, Any] = {}
        used = 0
        for i, p in enumerate(self.specs):
            size = (p.level + 1) * n * 8
            if used + size > budget_bytes:
                break
            self.cache[i] = backend.encode(p.values, p.level, p.scale)
            used += size
        self.cached_bytes = used

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> Any:
        hit = self.cache.get(index)
        if hit is not None:
            return hit
        p = self.specs[index]
        return self.backend.encode(p.values, p.level, p.scale)


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
                 name: str = "model") -> None:
        self.plan = plan
        self.task = task
        self.labels = list(labels) if labels else [str(i) for i in range(plan.output_count)]
        self.name = name
        self.backend = SealBackend(plan.params)
        self.plains = EncodedPlains(self.backend, plan, PLAINTEXT_CACHE_BYTES)
        self._public = plan.public()
        self._lock = threading.Lock()

    @property
    def plan_id(self) -> str:
        return self._public["plan_id"]

    def spec(self) -> dict[str, Any]:
        return {"scheme": SCHEME, "format": SPEC_FORMAT, "model": self.name, "task": self.task,
                "labels": self.labels, **self._public}

    def load_keys(self, data: bytes) -> CKKSKeys:
        parts = wire.unpack(data, wire.KIND_KEYS, self.plan_id)
        if len(parts) != 2:
            raise CiphertextError(f"evaluation keys must have 2 parts (Galois, relinearization), got {len(parts)}")
        probe = SealBackend(self.plan.params)
        probe.load_evaluation_keys(parts[0], parts[1], self._public["key_levels"])
        missing = [s for s in self.plan.rotation_steps if not probe.has_rotation(s)]
        if missing:
            raise CiphertextError(f"evaluation keys lack rotations {missing[:5]}: create them with this server's spec")
        if self.plan.needs_relin and probe.relin_keys is None:
            raise CiphertextError("evaluation keys lack relinearization keys: create them with this server's spec")
        return CKKSKeys(probe.galois_keys, probe.relin_keys, len(data))

    def load_inputs(self, ciphertext: bytes) -> list[Any]:
        parts = wire.unpack(ciphertext, wire.KIND_INPUT, self.plan_id)
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
        return wire.pack(wire.KIND_OUTPUT, self.plan_id, [self.backend.serialize(out)])

    def evaluate(self, keys: CKKSKeys, cts: list[Any], hook: Callable[[int, Any], None] | None = None) -> Any:
        with self._lock:
            self.backend.galois_keys, self.backend.relin_keys = keys.galois, keys.relin
            try:
                return run_program(self.plan, self.backend, self.plains, cts, hook)
            except (ValueError, RuntimeError) as exc:
                raise CiphertextError(f"SEAL refused to evaluate the input ({exc}): encrypt and create keys "
                                      "with this server's spec") from None
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


def compile_ckks(artifact: Any, **options: Any) -> CKKSServerModel:
    """Compile a loaded ``ModelArtifact`` for CKKS (options: see ``compile_plan``; card scheme_options apply)."""
    card = artifact.card
    merged = {**((card.get("scheme_options") or {}).get("ckks") or {}), **options}
    plan = compile_plan(artifact.model, input_shape_of(artifact), card.get("activation_ranges"), **merged)
    return CKKSServerModel(plan, task=card.get("task", "multi-class"), labels=card.get("labels"),
                           name=card.get("name", "model"))


def server_from_model(model: torch.nn.Module, input_shape: tuple[int, ...], task: str = "multi-class",
                      labels: list[str] | None = None, activation_ranges: dict | None = None,
                      **options: Any) -> CKKSServerModel:
    """Bring-your-own torch model: compile and wrap in one call."""
    plan = compile_plan(model, input_shape, activation_ranges, **options)
    return CKKSServerModel(plan, task=task, labels=labels)


__all__ = ["CKKSServerModel", "CKKSKeys", "compile_ckks", "server_from_model", "run_program", "input_shape_of"]
