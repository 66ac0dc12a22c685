"""The TFHE server: holds the compiled Concrete circuit (the private integer weights live inside it).

It publishes a JSON spec with Concrete's client specs (base64) so any client can generate keys for exactly this
circuit; it accepts only framed evaluation keys and ciphertexts for this circuit's fingerprint.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from medhe.errors import CiphertextError, PlanError
from medhe.he.scheme import ServerModel
from medhe.he.tfhe import wire
from medhe.he.tfhe.circuit import DEFAULT_EXACTNESS, compile_circuit, fhe, params_report
from medhe.models.quant import IntegerFCNN

SPEC_FORMAT = "medhe-tfhe/1"
MODES = ("execute", "simulate")


class TFHEServerModel(ServerModel):
    """A compiled TFHE circuit for one QAT model; ``mode="simulate"`` can only simulate (no keys, no ciphertexts)."""

    scheme = "tfhe"

    def __init__(self, integer: IntegerFCNN, card: dict[str, Any], mode: str = "execute",
                 exactness: str = DEFAULT_EXACTNESS, p_error: float | None = None,
                 calibration: np.ndarray | None = None, **config: Any) -> None:
        if mode not in MODES:
            raise PlanError(f"fhe mode {mode!r} is not one of {', '.join(MODES)}")
        self.integer = integer
        self.card = card
        self.mode = mode
        self.circuit = compile_circuit(integer, simulate_only=mode == "simulate", exactness=exactness,
                                       p_error=p_error, calibration=calibration, **config)
        self.params = params_report(self.circuit, integer, exactness, p_error, executable=mode == "execute")
        self._spec: dict[str, Any] | None = None
        if mode == "execute":
            self._client_specs = self.circuit.client.specs.serialize()
            self.fingerprint = wire.fingerprint(self._client_specs)

    def report_params(self) -> dict[str, Any]:
        # what evaluated: Concrete's simulation (no ciphertexts) or its encrypted execution
        return {"backend": f"concrete-{self.mode}"}

    # -- plain paths --------------------------------------------------------------------------------------------
    def simulate(self, q: np.ndarray) -> np.ndarray:
        """Concrete's simulation of the circuit on quantized inputs: int (N, input_size) -> int (N, outputs)."""
        q = np.asarray(q, dtype=np.int64)
        return np.stack([np.asarray(self.circuit.simulate(row), dtype=np.int64) for row in q])

    def reference(self, q: np.ndarray) -> np.ndarray:
        """The same integer program in numpy (no Concrete): the quantized-plain reference."""
        return self.integer.run(q)

    # -- ServerModel --------------------------------------------------------------------------------------------
    def _require_execute(self, what: str) -> None:
        if self.mode != "execute":
            raise PlanError(f"this TFHE model was compiled with fhe='simulate', which cannot {what}; "
                            "compile it with fhe='execute'")

    def spec(self) -> dict[str, Any]:
        self._require_execute("serve encrypted clients")
        if self._spec is None:
            integer = self.integer
            self._spec = {
                "scheme": "tfhe",
                "format": SPEC_FORMAT,
                "model": self.card.get("name"),
                "task": self.card.get("task"),
                "labels": list(self.card.get("labels", [])),
                "input": {"shape": list(integer.in_shape), "pool": integer.pool, "bits": integer.input_bits,
                          "range": list(integer.input_range), "size": integer.input_size},
                # "count" as in every scheme's spec; "size" is the pre-schema name, kept for clients that read it
                "output": {"count": int(integer.layers[-1].weight.shape[0]),
                           "size": int(integer.layers[-1].weight.shape[0]), "scale": integer.output_scale},
                "fingerprint": self.fingerprint.hex(),
                "client_specs": base64.b64encode(self._client_specs).decode("ascii"),
                "params": self.params,
            }
        return self._spec

    def load_keys(self, data: bytes) -> Any:
        self._require_execute("load keys")
        payload = wire.unpack(data, wire.KIND_KEYS, self.fingerprint)
        try:
            return fhe.EvaluationKeys.deserialize(payload)
        except Exception as exc:  # concrete raises bare RuntimeError on bad bytes
            raise CiphertextError(f"TFHE evaluation keys do not deserialize ({str(exc).splitlines()[0][:120]}); "
                                  "generate them again with this server's spec") from None

    def infer(self, keys: Any, ciphertext: bytes) -> bytes:
        self._require_execute("run encrypted inference")
        if not isinstance(keys, fhe.EvaluationKeys):
            raise CiphertextError("TFHE inference needs the object returned by load_keys(); load the client's keys first")
        payload = wire.unpack(ciphertext, wire.KIND_INPUT, self.fingerprint)
        try:
            value = fhe.Value.deserialize(payload)
            out = self.circuit.server.run(value, evaluation_keys=keys)
        except Exception as exc:
            raise CiphertextError(f"TFHE input ciphertext was rejected ({str(exc).splitlines()[0][:120]}); "
                                  "encrypt it again with a client made from this server's spec") from None
        return wire.pack(wire.KIND_OUTPUT, self.fingerprint, out.serialize())
