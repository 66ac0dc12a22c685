"""``medhe bench --scheme ckks``: medhe's CKKS engine against the TenSEAL Tutorial-4 pipeline, same run, same machine.

Timings on a shared machine drift by 2x between minutes, so a ratio is only meaningful when both sides run back
to back on the same images; this module measures, in one call:

(a) TenSEAL Tutorial 4, verbatim (:mod:`medhe.he.ckks.tenseal_ref`);
(b) the *identical* network (same weights, arch ``tenseal-tutorial4``) compiled by medhe: the ratio on equal work;
(c) the default shipped model through medhe: what a user actually gets.

The Tutorial-4 weights come from a short, seeded training run on the benchmark dataset (a few seconds) with a
penalty that keeps logits inside TenSEAL's output range (its last prime leaves ~4 bits above the 2^26 scale), so
both engines can be checked against the plaintext logits. "eval" is the server's bytes -> bytes step on both
sides: deserialize the input, evaluate, serialize the result (medhe's ``server.infer``; for TenSEAL
``ckks_vector_from`` + the tutorial's ``forward`` + ``serialize``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from medhe.errors import DataError
from medhe.machine import load_average, machine_info
from medhe.stats import summarize

TARGETS = {"identical_work": 45.0, "default_model": 40.0}  # x faster than TenSEAL (engine v2 acceptance, issue #15)
TUTORIAL4_OUTPUTS = 10


def _stats_ms(seconds: list[float]) -> dict[str, float]:
    return summarize(np.asarray(seconds, dtype=float) * 1e3)


def _normalise(images: np.ndarray) -> np.ndarray:
    """uint8 28x28 -> the Tutorial-4 network's input: [0, 1] then mean 0.5 / std 0.5 (as medhe's cards record)."""
    return ((images.astype(np.float32) / 255.0) - 0.5) / 0.5


def train_tutorial4(x: np.ndarray, labels: np.ndarray, epochs: int = 3, seed: int = 0,
                    logit_bound: float = 4.0) -> nn.Sequential:
    """Seeded quick training of the Tutorial-4 net; |logit| above ``logit_bound`` is penalised (TenSEAL range)."""
    from medhe.he.ckks.tenseal_ref import tutorial4_model
    from medhe.models.train import record_ranges

    model = tutorial4_model(TUTORIAL4_OUTPUTS, seed=seed)
    xt = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    yt = torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.long)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            out = model(xt[idx])
            loss = nn.functional.cross_entropy(out, yt[idx]) + (out.abs() - logit_bound).clamp(min=0).pow(2).mean()
            loss.backward()
            opt.step()
    model.eval()
    record_ranges(model, x.reshape(-1, 1, 28, 28))
    return model


def tutorial4_artifact(model: nn.Sequential, dataset: str):
    """An in-memory model artifact for the Tutorial-4 net, so medhe compiles it like any shipped model."""
    from medhe.data import Preprocess
    from medhe.models.artifact import FORMAT, ModelArtifact
    from medhe.models.layers import activation_ranges

    card = {
        "format": FORMAT, "name": "tenseal-tutorial4", "arch": "tenseal-tutorial4",
        "arch_kwargs": {"in_channels": 1, "num_outputs": TUTORIAL4_OUTPUTS, "image_size": 28},
        "task": "multi-class", "labels": [f"class_{i}" for i in range(TUTORIAL4_OUTPUTS)],
        "dataset": {"name": dataset, "size": 28},
        "preprocessing": Preprocess(channels=1, size=28, crop=None, mean=0.5, std=0.5).to_dict(),
        "activation_ranges": activation_ranges(model),
        "training": {"command": "medhe.he.ckks.bench.train_tutorial4 (benchmark weights)", "seed": 0, "epochs": 3},
    }
    return ModelArtifact(model=model, card=card)


def _plain(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def _quality(plain: np.ndarray, enc: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    out = {"max_abs_logit_error": float(np.max(np.abs(enc - plain))),
           "argmax_agreement": float(np.mean(enc.argmax(1) == plain.argmax(1))),
           "plain_max_abs_logit": float(np.max(np.abs(plain)))}
    if labels is not None:
        out["encrypted_acc"] = float(np.mean(enc.argmax(1) == np.asarray(labels).reshape(-1)))
    return out


class _Runner:
    """One engine under test: set up once (keys), then one encrypt -> eval -> decrypt per image."""

    def __init__(self) -> None:
        self.enc_s: list[float] = []
        self.eval_s: list[float] = []
        self.dec_s: list[float] = []
        self.logits: list[np.ndarray] = []

    def _record(self, enc_s: float, eval_s: float, dec_s: float, logits: np.ndarray) -> None:
        self.enc_s.append(enc_s)
        self.eval_s.append(eval_s)
        self.dec_s.append(dec_s)
        self.logits.append(np.asarray(logits, dtype=np.float64))

    def latency(self) -> dict[str, Any]:
        return {"encrypt": _stats_ms(self.enc_s), "eval": _stats_ms(self.eval_s), "decrypt": _stats_ms(self.dec_s)}


class _TenSEALRunner(_Runner):
    def __init__(self, model: nn.Sequential, n_threads: int | None = None) -> None:
        from medhe.he.ckks.tenseal_ref import TenSEALTutorial4

        super().__init__()
        self.model = model
        self.ref = TenSEALTutorial4(model, n_threads=n_threads)
        self.in_bytes = self.out_bytes = 0

    def step(self, image: np.ndarray) -> None:
        times, logits, self.in_bytes, self.out_bytes = self.ref.one(image)  # bytes in, bytes out
        self._record(*times, logits)

    def report(self, images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        from medhe.he.ckks.tenseal_ref import BITS_SCALE, COEFF_MOD_BIT_SIZES, POLY_MODULUS_DEGREE

        n = len(self.logits)
        return {
            "engine": "tenseal", "n_images": n, "n_threads": self.ref.n_threads or os.cpu_count(),
            "params": {"poly_modulus_degree": POLY_MODULUS_DEGREE, "coeff_mod_bit_sizes": COEFF_MOD_BIT_SIZES,
                       "scale_bits": BITS_SCALE},
            "latency_ms": {"keygen": round(self.ref.keygen_s * 1e3, 3), **self.latency()},
            "bytes": {"input_ciphertext": self.in_bytes, "output_ciphertext": self.out_bytes,
                      "evaluation_keys": self.ref.key_bytes(),
                      "note": "TenSEAL's own serialize(); keys = public context (Galois + relin + public key)"},
            "quality": _quality(_plain(self.model, images[:n].reshape(-1, 1, 28, 28)), np.stack(self.logits),
                                None if labels is None else labels[:n]),
        }


class _MedheRunner(_Runner):
    """medhe through the public scheme interface only: compile, keygen, then bytes in, bytes out."""

    def __init__(self, artifact: Any) -> None:
        from medhe.he.scheme import client_for, compile_model

        super().__init__()
        self.artifact = artifact
        t0 = time.perf_counter()
        self.server = compile_model(artifact, "ckks")
        self.compile_s = time.perf_counter() - t0
        self.client = client_for(self.server.spec())
        t0 = time.perf_counter()
        self.client.keygen()
        self.eval_keys = self.client.evaluation_keys()
        self.keygen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.keys = self.server.load_keys(self.eval_keys)
        self.load_keys_s = time.perf_counter() - t0
        self.ct = self.out = b""

    def step(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.ct = self.client.encrypt(np.asarray(x, dtype=np.float32))
        t1 = time.perf_counter()
        self.out = self.server.infer(self.keys, self.ct)
        t2 = time.perf_counter()
        logits = self.client.decrypt(self.out)
        t3 = time.perf_counter()
        self._record(t1 - t0, t2 - t1, t3 - t2, logits)

    def report(self, inputs: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        spec = self.server.spec()
        return {
            "engine": "medhe", "model": self.artifact.name, "n_images": len(self.logits),
            "params": {**spec.get("params", {}), **self.server.report_params()},
            "rotation_steps": len(spec.get("rotation_steps", [])),
            "latency_ms": {"compile": round(self.compile_s * 1e3, 3), "keygen": round(self.keygen_s * 1e3, 3),
                           "load_keys": round(self.load_keys_s * 1e3, 3), **self.latency()},
            "bytes": {"input_ciphertext": len(self.ct), "output_ciphertext": len(self.out),
                      "evaluation_keys": len(self.eval_keys),
                      "raw": _raw_sizes(self.server, {"input_ciphertext": self.ct, "output_ciphertext": self.out,
                                                      "evaluation_keys": self.eval_keys})},
            "quality": _quality(_plain(self.artifact.model, inputs), np.stack(self.logits), labels),
        }


def _raw_sizes(server: Any, messages: dict[str, bytes]) -> dict[str, int]:
    """SEAL's own uncompressed size of each message's ciphertexts/keys (the "raw" next to the bytes as sent)."""
    from medhe.he.ckks.backends.seal import seal_context
    from medhe.he.ckks.wire import envelope, serialize

    context = seal_context(server.plan.params)  # sizes are SEAL's, whichever backend evaluated
    kinds = {"input_ciphertext": envelope.KIND_INPUT, "output_ciphertext": envelope.KIND_OUTPUT,
             "evaluation_keys": envelope.KIND_KEYS}
    out = {}
    for name, data in messages.items():
        parts = envelope.unpack(data, kinds[name], server.plan_id)
        out[name] = sum(serialize.raw_size(p, serialize.frame_kind(p), context) for p in parts if p)
        out[f"{name}_parts"] = len(parts)
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def _machine() -> dict[str, Any]:
    import seal

    info = {**machine_info(), "torch_threads": torch.get_num_threads(),
            "seal_python": getattr(seal, "__version__", "?")}
    try:
        import tenseal

        info["tenseal"] = tenseal.__version__
    except Exception:  # TenSEAL is optional: the PlanError comes from the reference itself
        pass
    return info


def run_ckks_benchmark(model: str = "pneumoniamnist", n_images: int = 20, data_dir: str | os.PathLike | None = None,
                       progress: bool = True, n_reference: int | None = None,
                       tenseal_threads: int | None = None) -> dict[str, Any]:
    """Time (a) TenSEAL Tutorial 4, (b) the same net through medhe, (c) ``model`` through medhe; JSON-able dict.

    ``n_reference`` limits the TenSEAL images (seconds each; default: ``n_images``); ``tenseal_threads`` is
    TenSEAL's thread count (default: all cores, as the tutorial runs; medhe's SEAL calls use one thread).
    Ratios are medians of TenSEAL over medhe for server evaluation and for encrypt + eval + decrypt.
    """
    from medhe.data import load_dataset
    from medhe.models.artifact import load_artifact

    if n_images < 1:
        raise DataError(f"n_images must be at least 1, not {n_images}")
    load_start = load_average()  # shared machines drift
    artifact = load_artifact(model)
    ds_card = artifact.card.get("dataset")
    if not (isinstance(ds_card, dict) and ds_card.get("name")):
        raise DataError(f"model {model!r} was not trained on a MedMNIST dataset; benchmark a 28x28 MedMNIST model")
    dataset = str(ds_card["name"])
    test = load_dataset(dataset, split="test", size=28, data_dir=data_dir, channels=1)
    train = load_dataset(dataset, split="train", size=28, data_dir=data_dir, channels=1)
    if test.images.shape[1:3] != (28, 28):
        raise DataError(f"the Tutorial-4 comparison needs 28x28 images; {dataset} gives {test.images.shape[1:3]}")
    pick = np.arange(min(n_images, len(test)))
    labels = test.labels[pick, 0] if test.labels.shape[1] == 1 else None
    x_t4 = _normalise(test.images[pick])

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny net: one thread is ~10x faster than two on a busy 2-core machine
    try:
        t4_model = train_tutorial4(_normalise(train.images), train.labels[:, 0])
    finally:
        torch.set_num_threads(threads)
    train_s = time.perf_counter() - t0
    if progress:
        print(f"tutorial-4 weights trained in {train_s:.1f} s", flush=True)

    pre = artifact.preprocess()
    x_default = pre.batch(load_dataset(dataset, split="test", size=pre.size, data_dir=data_dir,
                                       channels=pre.channels).images[pick])
    n_ref = len(pick) if n_reference is None else max(1, min(int(n_reference), len(pick)))
    # set up all three, then run them back to back per image: the machine's load drifts, the ratio should not
    tenseal = _TenSEALRunner(t4_model, tenseal_threads)
    medhe_t4 = _MedheRunner(tutorial4_artifact(t4_model, dataset))
    medhe_default = _MedheRunner(artifact)
    for i in range(len(pick)):
        if i < n_ref:
            tenseal.step(x_t4[i])
        medhe_t4.step(x_t4[i].reshape(1, 28, 28))
        medhe_default.step(x_default[i])
        if progress:
            ts_ms = f"{tenseal.eval_s[-1] * 1e3:8.1f}" if i < n_ref else "       -"
            print(f"  image {i + 1}/{len(pick)}: eval ms  tenseal {ts_ms}  medhe same-net "
                  f"{medhe_t4.eval_s[-1] * 1e3:7.1f}  medhe {artifact.name} {medhe_default.eval_s[-1] * 1e3:7.1f}",
                  flush=True)
    tenseal = tenseal.report(x_t4, labels)
    medhe_t4 = medhe_t4.report(x_t4.reshape(-1, 1, 28, 28), labels)
    medhe_default = medhe_default.report(x_default, labels)

    def total(r: dict[str, Any]) -> float:
        lat = r["latency_ms"]
        return lat["encrypt"]["median"] + lat["eval"]["median"] + lat["decrypt"]["median"]

    ts_eval = tenseal["latency_ms"]["eval"]["median"]
    ratios = {
        "eval_identical_work": _ratio(ts_eval, medhe_t4["latency_ms"]["eval"]["median"]),
        "eval_default_model": _ratio(ts_eval, medhe_default["latency_ms"]["eval"]["median"]),
        "end_to_end_identical_work": _ratio(total(tenseal), total(medhe_t4)),
        "end_to_end_default_model": _ratio(total(tenseal), total(medhe_default)),
    }
    machine = _machine()
    machine["load_average_1m_start"] = load_start
    return {
        "benchmark": "ckks-vs-tenseal-tutorial4",
        "machine": machine,
        "dataset": dataset, "n_images": int(len(pick)), "n_reference_images": int(n_ref),
        "tutorial4_training_s": round(train_s, 3),
        "tenseal_tutorial4": tenseal,
        "medhe_tutorial4": medhe_t4,
        "medhe_default": medhe_default,
        "ratios": ratios,
        # how medhe ran (both medhe runs share one backend choice); the weakest parameter set's security
        "params": {"backend": medhe_default["params"]["backend"],
                   "security_bits": min(medhe_t4["params"]["security_bits"],
                                        medhe_default["params"]["security_bits"])},
        "targets": TARGETS,
        "meets_targets": {key: ratios[f"eval_{key}"] is not None and ratios[f"eval_{key}"] >= target
                          for key, target in TARGETS.items()},
    }


def format_summary(report: dict[str, Any]) -> str:
    """Human-readable lines for the CLI (the JSON carries everything)."""
    lines = []
    for key, title in (("tenseal_tutorial4", "TenSEAL Tutorial 4"), ("medhe_tutorial4", "medhe, same network"),
                       ("medhe_default", f"medhe, {report['medhe_default'].get('model', 'default')}")):
        r = report[key]
        lat, q, b = r["latency_ms"], r["quality"], r["bytes"]
        raw = b.get("raw") or {}
        sizes = (f"in {b['input_ciphertext'] / 1e6:5.2f} MB, keys {b['evaluation_keys'] / 1e6:5.1f} MB"
                 + (f" (SEAL raw {raw['input_ciphertext'] / 1e6:.2f} / {raw['evaluation_keys'] / 1e6:.1f} MB)"
                    if raw else ""))
        lines.append(f"{title:26s} eval {lat['eval']['median']:8.1f} ms (p95 {lat['eval']['p95']:.1f}), "
                     f"enc {lat['encrypt']['median']:6.1f} ms, dec {lat['decrypt']['median']:5.1f} ms, {sizes}, "
                     f"max|logit err| {q['max_abs_logit_error']:.2g}, argmax agreement {q['argmax_agreement']:.2f}")
    r = report["ratios"]
    lines.append(f"TenSEAL / medhe, median server eval: identical work {r['eval_identical_work']}x "
                 f"(target {TARGETS['identical_work']:g}x), default model {r['eval_default_model']}x "
                 f"(target {TARGETS['default_model']:g}x); end to end {r['end_to_end_identical_work']}x / "
                 f"{r['end_to_end_default_model']}x")
    return "\n".join(lines)


def run_serialization_benchmark(chains: dict[int, list[int]] | None = None, repeats: int = 7,
                                rotation_steps: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Bytes per object (SEAL raw, compact, compact + seeded) and encode/decode medians, per ring degree.

    Default chains: N=8192 [35, 28 x 5, 43] (the measured design, 218 bits) and N=16384 [38, 30 x 11, 50]
    (418 bits); both pass SEAL's 128-bit check.
    """
    import seal

    from medhe.he.ckks.wire import serialize as S
    from medhe.he.ckks.wire.seeder import Seeder

    chains = chains or {8192: [35, 28, 28, 28, 28, 28, 43], 16384: [38] + [30] * 11 + [50]}
    report: dict[str, Any] = {"benchmark": "ckks-serialization", "machine": _machine(), "rings": {}}

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)) * 1e3, 3)

    for n, bits in chains.items():
        parms = seal.EncryptionParameters(seal.scheme_type.ckks)
        parms.set_poly_modulus_degree(n)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(n, bits))
        ctx = seal.SEALContext(parms, True, seal.sec_level_type.tc128)
        keygen = seal.KeyGenerator(ctx)
        seeder = Seeder(ctx, keygen.secret_key())
        ct = seal.Encryptor(ctx, keygen.secret_key()).encrypt_symmetric(
            seal.CKKSEncoder(ctx).encode(np.linspace(-1, 1, n // 2), 2.0 ** bits[1]))
        galois = seal.GaloisKeys()
        keygen.create_galois_keys(list(rotation_steps), galois)
        relin = keygen.create_relin_keys()
        entry: dict[str, Any] = {"coeff_modulus_bits": bits}
        for name, obj, dump, load in (("input_ciphertext", ct, S.dump_ciphertext, S.load_ciphertext),
                                      ("galois_keys", galois, S.dump_galois_keys, S.load_galois_keys),
                                      ("relin_keys", relin, S.dump_relin_keys, S.load_relin_keys)):
            compact, seeded = dump(obj, ctx), dump(obj, ctx, seeder)
            entry[name] = {"raw": len(obj.to_string()), "compact": len(compact), "compact_seeded": len(seeded),
                           "dump_ms": median_ms(lambda: dump(obj, ctx)),
                           "dump_seeded_ms": median_ms(lambda: dump(obj, ctx, seeder)),
                           "load_ms": median_ms(lambda: load(compact, ctx)),
                           "load_seeded_ms": median_ms(lambda: load(seeded, ctx))}
        per_key = {k: v / len(rotation_steps) for k, v in entry["galois_keys"].items() if k in ("raw", "compact",
                                                                                             "compact_seeded")}
        entry["galois_key_per_step"] = {k: int(v) for k, v in per_key.items()}
        report["rings"][str(n)] = entry
    return report
