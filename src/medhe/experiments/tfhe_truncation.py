"""Where pneumoniamnist-qfcnn's TFHE time goes (issue 34): the same integer function lowered with t of its k
rounded bits truncated (t PBS per neuron) before a (10 - t)-bit lookup, timed on the first N test images.

    MEDHE_DATA=/path/to/data N=4 .venv/bin/python -m medhe.experiments.tfhe_truncation 5:multi 4:multi 5:mono \
        5:multi:global_p_error=0.001

Each argument is ``t:strategy[:option=value]``. Prints one JSON line per design: PBS count and parameters, key
sizes, keygen, server-run medians (wall and CPU) and how many images executed and simulated bit-exactly against
the numpy integer program. Low t means huge lookups (t=1: N=32768, 2.5 GB of bootstrap keys): one job at a time.
"""
import json
import os
import sys
import time
import warnings

import numpy as np

from concrete import fhe
from concrete.fhe.compilation.configuration import SecurityLevel

from medhe.data import load_dataset
from medhe.he.tfhe.circuit import COMPRESSION, default_inputset
from medhe.models.artifact import load_artifact

STRATEGIES = {"mono": fhe.ParameterSelectionStrategy.MONO, "multi": fhe.ParameterSelectionStrategy.MULTI}


def build(integer, trunc):
    """acc + half a step, truncate min(trunc, k) bits, then a lookup that does the rest of floor(. / 2**k)."""
    def forward(x):
        h = x
        for layer in integer.layers:
            k = layer.lsbs
            half = (1 << (k - 1)) if (k and layer.table is not None) else 0
            acc = fhe.hint(h @ layer.weight.T + (layer.bias + half), bit_width=layer.acc_bits)
            if layer.table is None:
                return acc
            if min(trunc, k):
                acc = fhe.truncate_bit_pattern(acc, lsbs_to_remove=min(trunc, k))

            def lookup(v, table=layer.table, off=layer.table_offset, k=k):
                idx = np.floor_divide(np.asarray(v, dtype=np.int64), 1 << k) - off
                return table[np.clip(idx, 0, len(table) - 1)]
            h = fhe.univariate(lookup)(acc)
        return h
    return forward


def run(integer, q, ref, trunc, strategy, extra):
    cfg = fhe.Configuration(security_level=SecurityLevel.SECURITY_128_BITS, fhe_simulation=True,
                            parameter_selection_strategy=strategy, **COMPRESSION, **extra)
    t0 = time.perf_counter()
    c = fhe.Compiler(build(integer, trunc), {"x": "encrypted"}).compile(default_inputset(integer, q), cfg)
    info = {"trunc": trunc, "strategy": strategy.name, "extra": extra, "pbs": c.programmable_bootstrap_count,
            "p_error": c.p_error, "bsk_MB": c.size_of_bootstrap_keys / 1e6, "ksk_MB": c.size_of_keyswitch_keys / 1e6,
            "compile_s": round(time.perf_counter() - t0, 1),
            "params": [(p.polynomial_size(), p.glwe_dimension(), p.input_lwe_dimension(), p.level(), p.base_log(), n)
                       for p, n in c.programmable_bootstrap_count_per_parameter.items()]}
    t0 = time.perf_counter()
    c.keygen(force=True)
    info["keygen_s"] = round(time.perf_counter() - t0, 1)
    wall, cpu, ok = [], [], 0
    for row, r in zip(q, ref):
        enc = c.encrypt(row)
        w, p = time.perf_counter(), time.process_time()
        out = c.run(enc)
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - p) * 1e3)
        ok += int(np.array_equal(np.asarray(c.decrypt(out)), r))
    info.update({"eval_ms_median": round(float(np.median(wall)), 1), "eval_cpu_ms_median": round(float(np.median(cpu)), 1),
                 "exec_exact": ok, "sim_exact": sum(int(np.array_equal(np.asarray(c.simulate(row)), r))
                                                    for row, r in zip(q, ref)),
                 "n": len(q), "load": os.getloadavg()})
    print(json.dumps(info), flush=True)


def main(argv: list[str]) -> None:
    for spec in argv:  # bad arguments fail before the data and the model load
        if len(spec.split(":")) < 2 or spec.split(":")[1] not in STRATEGIES or not spec.split(":")[0].isdigit():
            sys.exit(f"error: {spec!r} is not t:mono|multi[:option=value]")
    warnings.simplefilter("ignore")
    art = load_artifact(os.environ.get("MODEL", "pneumoniamnist-qfcnn"))
    integer = art.model.export_integer()
    pre = art.preprocess()
    test = load_dataset(art.card["dataset"]["name"], split="test", size=pre.size)
    q = integer.quantize_input(pre.batch(test.images[:int(os.environ.get("N", 5))]))
    ref = integer.run(q)
    for spec in argv:
        trunc, strategy, *options = spec.split(":")
        run(integer, q, ref, int(trunc), STRATEGIES[strategy],
            {k: float(v) for k, v in (o.split("=", 1) for o in options)})


if __name__ == "__main__":
    main(sys.argv[1:])
