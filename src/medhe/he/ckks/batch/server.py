"""Server side of batch mode: the batch plan, its compiled kernels, and ``infer_batch`` on bytes."""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from medhe.errors import CiphertextError, PlanError
from medhe.he.ckks.backends.seal import seal_context
from medhe.he.ckks.batch import rns
from medhe.he.ckks.batch.compiler import BatchPlan, compile_batch_plan
from medhe.he.ckks.batch.runtime import SealBoundary, build_kernels, default_threads, make_boundary, run_batch
from medhe.he.ckks.wire import envelope as wire
from medhe.he.ckks.wire import serialize
from medhe.he.security import security_bits

SPEC_FORMAT = "medhe-ckks-batch-spec/1"
MEMORY_ENV = "MEDHE_BATCH_MEMORY"
DEFAULT_MEMORY_BYTES = 4 << 30  # one batch's arrays: a model beyond this is refused, not OOM-killed


def memory_budget() -> int:
    try:
        return int(float(os.environ.get(MEMORY_ENV, "")) * (1 << 30)) if os.environ.get(MEMORY_ENV) else \
            DEFAULT_MEMORY_BYTES
    except ValueError:
        raise PlanError(f"{MEMORY_ENV} must be a number of GiB, not {os.environ[MEMORY_ENV]!r}") from None


class CKKSBatchServer:
    """A model compiled for one image per slot; holds no secret key, only the client's relinearization keys."""

    scheme = "ckks"

    def __init__(self, plan: BatchPlan, task: str = "multi-class", labels: list[str] | None = None,
                 name: str = "model", threads: int | None = None, boundary: str = "auto") -> None:
        need, budget = plan.memory_bytes(), memory_budget()
        if need > budget:
            raise PlanError(f"batch mode would need ~{need / (1 << 30):.1f} GiB of server memory per batch for this "
                            f"model (N={plan.params.poly_degree}, {plan.input_count} input ciphertexts, "
                            f"{len(plan.segments)} segments), over the {budget / (1 << 30):.1f} GiB budget: evaluate "
                            f"it one image at a time, or raise {MEMORY_ENV} (GiB)")
        self.plan = plan
        self.task = task
        self.labels = list(labels) if labels else [str(i) for i in range(plan.output_count)]
        self.name = name
        self.threads = threads
        self.boundary = boundary  # where relinearize/rescale run: auto | native | seal
        self.kernels = build_kernels(plan)
        self.context = seal_context(plan.params)
        self._public = plan.public()
        self._lock = threading.Lock()

    @property
    def plan_id(self) -> str:
        return self._public["plan_id"]

    @property
    def batch_size(self) -> int:
        return self.plan.batch

    def report_params(self) -> dict[str, Any]:
        """What ran (the batch kernel; SEAL only at segment ends) and the security level of the chain."""
        params = self.plan.params
        engine = "native" if type(make_boundary(self.plan, None, self.boundary)).__name__.startswith("Native") else "seal"
        from medhe.he.ckks.server import _seal_library

        return {"library": _seal_library(), "backend": f"batch-kernel+{engine}",
                "security_bits": security_bits(params.poly_degree, params.prime_bits)}

    def spec(self) -> dict[str, Any]:
        return {"scheme": "ckks", "mode": "batch", "format": SPEC_FORMAT, "model": self.name, "task": self.task,
                "labels": self.labels, **self._public}

    def key_held_bytes(self) -> int:
        """What one loaded batch key set (one relinearization key) holds, a function of the spec: the service
        accounts it at this, not at its much smaller upload."""
        from medhe.he.ckks.limits import ckks_key_held_bytes

        return ckks_key_held_bytes(self.spec()["params"])

    def load_keys(self, data: bytes) -> Any:
        """The client's relinearization keys (the only evaluation key a batch plan uses)."""
        parts = wire.unpack(data, wire.KIND_KEYS, self.plan_id)
        if len(parts) != 1 or not parts[0]:
            raise CiphertextError("batch evaluation keys must hold exactly the relinearization keys: create them "
                                  "with a batch client for this server's batch spec")
        need = {serialize.RELIN_KEY_INDEX: int(self._public["key_levels"]["relin"])}
        return serialize.load_relin_keys(parts[0], self.context, need)

    def load_inputs(self, data: bytes) -> np.ndarray:
        """(input ciphertexts, 2, primes, N) residues of one encrypted batch, checked against the plan."""
        parts = wire.unpack(data, wire.KIND_INPUT, self.plan_id)
        if len(parts) != self.plan.input_count:
            raise CiphertextError(f"encrypted batch has {len(parts)} ciphertexts, this model expects "
                                  f"{self.plan.input_count}: encrypt with a batch client built from this server's "
                                  "batch spec")
        level = self.plan.input_level
        top = list(self.context.first_context_data().parms_id())
        # uint32 (every batch prime is below 2^31): half the memory of SEAL's uint64 words, read as is by the kernel
        out = np.empty((len(parts), 2, level + 1, self.plan.params.poly_degree), dtype=np.uint32)

        def load(i: int) -> None:
            ct = serialize.load_ciphertext(parts[i], self.context)
            if ct.size() != 2 or list(ct.parms_id()) != top:
                raise CiphertextError(f"input ciphertext {i} is not a fresh ciphertext at the top level: encrypt "
                                      "with this server's batch spec")
            if not math.isclose(ct.scale(), float(self.plan.input_scale), rel_tol=1e-9):
                raise CiphertextError(f"input ciphertext {i} has scale 2^{math.log2(ct.scale()):.2f}, expected "
                                      f"2^{math.log2(float(self.plan.input_scale)):.2f}: encrypt with this "
                                      "server's batch spec")
            rns.to_array(ct, out[i])

        # SEAL's loader (seed expansion) and the numpy copies release the GIL: threads load ~2x faster on 2 cores
        with ThreadPoolExecutor(default_threads()) as pool:
            list(pool.map(load, range(len(parts))))
        return out

    def evaluate(self, relin_keys: Any, inputs: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        with self._lock:
            return run_batch(self.plan, self.kernels, inputs, make_boundary(self.plan, relin_keys, self.boundary),
                             self.threads, timings)

    def dump_outputs(self, outputs: np.ndarray) -> bytes:
        boundary = SealBoundary(self.plan, None)
        cts = boundary.output_ciphertexts(outputs, self.plan.output_level, float(self.plan.output_scale))
        return wire.pack(wire.KIND_OUTPUT, self.plan_id, [serialize.dump_ciphertext(ct, self.context) for ct in cts])

    def infer_batch(self, keys: Any, data: bytes, timings: dict[str, float] | None = None) -> bytes:
        """One encrypted batch (up to ``batch_size`` images) -> its encrypted logits."""
        return self.dump_outputs(self.evaluate(keys, self.load_inputs(data), timings))


def compile_ckks_batch(artifact: Any, threads: int | None = None, **options: Any) -> CKKSBatchServer:
    """A loaded ``ModelArtifact`` compiled for batch mode (options: see ``compile_batch_plan``)."""
    from medhe.he.ckks.server import input_shape_of

    card = artifact.card
    plan = compile_batch_plan(artifact.model, input_shape_of(artifact), card.get("activation_ranges"), **options)
    return CKKSBatchServer(plan, task=card.get("task", "multi-class"), labels=card.get("labels"),
                           name=card.get("name", "model"), threads=threads)


def batch_server_from_model(model: torch.nn.Module, input_shape: tuple[int, ...], task: str = "multi-class",
                            labels: list[str] | None = None, activation_ranges: dict | None = None,
                            **options: Any) -> CKKSBatchServer:
    return CKKSBatchServer(compile_batch_plan(model, input_shape, activation_ranges, **options), task, labels)
