"""Lower a frozen ``IntegerFCNN`` to a Concrete circuit, compile it, and report what it costs.

Per hidden layer the circuit is: clear-weight integer matmul + clear bias (leveled, no bootstrap), then rounding
away the accumulator's low bits, then ONE table lookup per neuron that applies scale, ReLU and the next quantizer.
The output layer is a leveled matmul whose integers the client dequantizes. Approximate rounding costs nothing
beyond the lookup (one programmable bootstrap, PBS, per hidden neuron); exact rounding adds the PBS that extract
the low bits (six per neuron in all for the shipped models).

Every accumulator is hinted to its *worst-case* bit width (over all in-range inputs), not just the widths seen
in the inputset, so an unusual but valid input can never overflow and wrap around inside the circuit.

Rounding is exact by default, so simulation, execution and the numpy integer program agree bit for bit. It is
built as ``truncate_bit_pattern(acc + 2**(k-1))`` with the half folded into the clear bias: the same round-half-up
that QAT trains with, and cheaper than Concrete's exact ``round_bit_pattern`` (on pneumoniamnist-qfcnn, 486 ms and
476 MB of bootstrap keys against 602 ms and 790 MB). ``"approximate"`` (Concrete's approximate rounding) is about
2.4x faster, but a value near a rounding boundary may round either way, independently in simulation and in each
execution, so an image near the decision boundary can come out differently.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from medhe import temproot
from medhe.errors import PlanError
from medhe.he.security import TFHE_SECURITY_BITS
from medhe.models.quant import IntegerFCNN, IntegerLayer

with warnings.catch_warnings():  # concrete's namespace package import warns about pkg_resources
    warnings.simplefilter("ignore")
    from concrete import fhe
    from concrete.fhe.compilation.configuration import SecurityLevel

#: Concrete's default security target; medhe never compiles below it.
SECURITY_BITS = TFHE_SECURITY_BITS  # the floor lives in medhe.he.security
EXACTNESS = ("exact", "approximate")
DEFAULT_EXACTNESS = "exact"
#: Seeded keys and inputs (Concrete's own compression): 274 -> 52 MB of keys and 3.2 MB -> 5 KB per input for
#: pneumoniamnist-qfcnn, at no measurable cost in evaluation time.
COMPRESSION = {"compress_evaluation_keys": True, "compress_input_ciphertexts": True}


def _table_fn(layer: IntegerLayer):
    """The activation table as a function of the rounded accumulator (a multiple of 2**lsbs)."""
    table, offset, k = layer.table, layer.table_offset, layer.lsbs

    def lookup(v):
        idx = np.floor_divide(np.asarray(v, dtype=np.int64), 1 << k) - offset
        return table[np.clip(idx, 0, len(table) - 1)]

    return lookup


def build_function(integer: IntegerFCNN, exactness: str, hints: bool = True):
    """The Python function Concrete traces: integer input vector -> integer output accumulators.

    ``hints=False`` lets Concrete size accumulators from the inputset alone (the conventional recipe, used by the
    benchmark's baseline); medhe's circuits hint the worst-case widths."""
    if exactness not in EXACTNESS:
        raise PlanError(f"rounding exactness {exactness!r} is not one of {', '.join(EXACTNESS)}")
    layers = integer.layers
    # exact: round half up = truncate after adding half a step, and the half rides on the clear bias for free
    halves = [1 << (layer.lsbs - 1) if (layer.lsbs and layer.table is not None and exactness == "exact") else 0
              for layer in layers]

    def forward(x):
        h = x
        for layer, half in zip(layers, halves):
            acc = h @ layer.weight.T + (layer.bias + half)
            if hints:  # acc_bits covers the largest value plus half a step (accumulator_plan), so no wrap-around
                acc = fhe.hint(acc, bit_width=layer.acc_bits)
            if layer.table is None:
                return acc
            if layer.lsbs and half:
                acc = fhe.truncate_bit_pattern(acc, lsbs_to_remove=layer.lsbs)
            elif layer.lsbs:
                acc = fhe.round_bit_pattern(acc, lsbs_to_remove=layer.lsbs, overflow_protection=False,
                                            exactness=fhe.Exactness.APPROXIMATE)
            h = fhe.univariate(_table_fn(layer))(acc)
        return h

    return forward


def default_inputset(integer: IntegerFCNN, calibration: np.ndarray | None = None, n_random: int = 32,
                     seed: int = 0) -> list[np.ndarray]:
    """Quantized calibration images plus random and corner inputs (all-zero, all-max)."""
    rng = np.random.default_rng(seed)
    d, top = integer.input_size, integer.input_levels
    inputs = [np.zeros(d, dtype=np.int64), np.full(d, top, dtype=np.int64)]
    inputs += [rng.integers(0, top + 1, d) for _ in range(n_random)]
    if calibration is not None and len(calibration):
        inputs += list(np.asarray(calibration, dtype=np.int64))
    return inputs


def compile_circuit(integer: IntegerFCNN, *, simulate_only: bool = False, exactness: str = DEFAULT_EXACTNESS,
                    p_error: float | None = None, global_p_error: float | None = None,
                    calibration: np.ndarray | None = None, hints: bool = True, **config: Any):
    """Compile ``integer`` for TFHE (128-bit security). ``simulate_only`` skips building the executable."""
    if exactness not in EXACTNESS:
        raise PlanError(f"rounding exactness {exactness!r} is not one of {', '.join(EXACTNESS)}")
    config = {**COMPRESSION, **config}
    if int(config.pop("security_level", SECURITY_BITS)) < SECURITY_BITS:
        raise PlanError(f"TFHE security below {SECURITY_BITS} bits is not allowed; drop the security_level option")
    compiler = fhe.Compiler(build_function(integer, exactness, hints), {"x": "encrypted"})
    configuration = fhe.Configuration(
        p_error=p_error, global_p_error=global_p_error, security_level=SecurityLevel.SECURITY_128_BITS,
        fhe_simulation=True, fhe_execution=not simulate_only, show_progress=False, show_optimizer=False,
        show_statistics=False, **config)
    # Concrete writes each compiled library (sharedlib.so: the private weights as machine code) to a mkdtemp()
    # folder it never removes; it goes under medhe's temp root and is removed with the circuit (medhe.temproot)
    folder = temproot.scratch("concrete")
    try:
        inputset = default_inputset(integer, calibration, n_random=32 if hints else 0)
        with temproot.tempfile_redirected(folder):
            circuit = compiler.compile(inputset if hints else inputset[2:], configuration)
    except (RuntimeError, ValueError) as exc:
        temproot.remove(folder)
        raise PlanError(f"Concrete could not compile this model ({str(exc).splitlines()[0]}); "
                        "lower acc_bits, act_bits or the hidden width and retrain") from None
    except BaseException:
        temproot.remove(folder)
        raise
    circuit.medhe_scratch = folder  # where its libraries live, for tests and debugging
    temproot.remove_with(circuit, folder)
    return circuit


def params_report(circuit: Any, integer: IntegerFCNN, exactness: str, requested_p_error: float | None,
                  executable: bool) -> dict[str, Any]:
    """Security, error probability, bit widths, bootstrap count and key sizes of a compiled circuit."""
    hidden = [m for m in integer.meta.get("layers", [])[:-1]]
    report: dict[str, Any] = {
        "library": f"concrete-python {fhe.__version__}",
        "security_bits": SECURITY_BITS,
        "p_error": float(circuit.p_error),
        "global_p_error": float(circuit.global_p_error),
        "requested_p_error": requested_p_error,
        "rounding": exactness,
        "input_bits": integer.input_bits,
        "input_size": integer.input_size,
        "pool": integer.pool,
        "accumulator_bits": [layer.acc_bits for layer in integer.layers],
        "tlu_input_bits": [m.get("tlu_input_bits") for m in hidden],
        "lsbs_rounded": [layer.lsbs for layer in integer.layers if layer.table is not None],
        "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
        "pbs_count": int(circuit.programmable_bootstrap_count),
        "key_switch_count": int(circuit.key_switch_count),
        "complexity": float(circuit.complexity),
    }
    if executable:
        report.update({
            "pbs_parameters": [
                {"polynomial_size": p.polynomial_size(), "glwe_dimension": p.glwe_dimension(),
                 "input_lwe_dimension": p.input_lwe_dimension(), "level": p.level(), "base_log": p.base_log(),
                 "count": int(n)}
                for p, n in circuit.programmable_bootstrap_count_per_parameter.items()],
            "bootstrap_key_bytes": int(circuit.size_of_bootstrap_keys),
            "keyswitch_key_bytes": int(circuit.size_of_keyswitch_keys),
            "secret_key_bytes": int(circuit.size_of_secret_keys),
            "input_ciphertext_bytes": int(circuit.size_of_inputs),
            "output_ciphertext_bytes": int(circuit.size_of_outputs),
        })
    return report
