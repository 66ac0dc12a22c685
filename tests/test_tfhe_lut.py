"""Issue 34: pneumoniamnist-qfcnn-lut is one exact lookup per hidden neuron (16 PBS, no rounding), bit-exact in
simulation, and ``medhe bench --scheme tfhe --against`` times two TFHE models on the same images with their ratio."""

import numpy as np

from medhe.data import load_dataset
from medhe.he.tfhe import compile_tfhe
from medhe.models.artifact import load_artifact


def test_lut_model_is_one_exact_lookup_per_neuron(data_dir):
    artifact = load_artifact("pneumoniamnist-qfcnn-lut")
    server = compile_tfhe(artifact, fhe="simulate")
    p = server.params
    hidden = artifact.card["arch_kwargs"]["hidden"][0]
    assert p["lsbs_rounded"] == [0] and p["pbs_count"] == hidden == 16  # no PBS spent on rounding
    assert p["accumulator_bits"][0] <= 5 and p["security_bits"] >= 128
    lo, hi = server.integer.layers[0].acc_range  # the worst case over every input, not just the data's
    assert -16 <= lo and hi <= 15
    pre = artifact.preprocess()
    q = server.integer.quantize_input(pre.batch(load_dataset("pneumoniamnist", split="val", size=pre.size,
                                                             data_dir=data_dir).images[:40]))
    assert np.array_equal(server.simulate(q), server.integer.run(q))  # simulation is the integer program
    corners = np.stack([np.zeros(q.shape[1], np.int64), np.full(q.shape[1], server.integer.input_levels)])
    assert np.array_equal(server.simulate(corners), server.integer.run(corners))


def test_bench_against_row_uses_the_same_images(data_dir):
    from medhe.he.tfhe.bench import run_tfhe_benchmark

    result = run_tfhe_benchmark("pneumoniamnist-qfcnn-lut", n_images=1, data_dir=data_dir, baseline_images=0,
                                against="pneumoniamnist-qfcnn-lut", progress=False)
    assert "baseline" not in result  # --baseline-images 0 with --against: the minutes-long baseline is left out
    ours, other = result["medhe"], result["against"]
    assert ours["n_images"] == other["n_images"] == 1 and other["pbs_count"] == 16
    assert ours["executed_equals_simulated_bits"] == other["executed_equals_simulated_bits"] == 1
    assert result["speedup_vs_against_eval_median"] == round(other["eval_ms_median"] / ours["eval_ms_median"], 2)
