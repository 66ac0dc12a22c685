"""Server time and peak memory of a multi-ciphertext plan, the server measured alone in its own process.

    python -m medhe.he.ckks.blockbench --shape 1x256x256 --width 8 --backend native --images 2 --json out.json
    python -m medhe.he.ckks.blockbench --model DIR_OR_NAME --backend seal --images 2

The parent compiles the plan (P1's ``latent-hecnn`` family at ``--shape``/``--width`` with seeded random weights and
randomised batch-norm statistics, or ``--model``), writes it as a plan file, makes the client's keys and encrypts
``--images`` random inputs; a child process then loads only the plan file, the keys and the ciphertexts, evaluates
them and reports its server time per image and its peak RSS (so compilation and the client's key generation do not
count). The parent decrypts and compares with the plaintext model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _model(args: argparse.Namespace) -> tuple[Any, tuple[int, ...], dict | None]:
    import torch
    from torch import nn

    if args.model:
        from medhe.he.ckks.server import input_shape_of
        from medhe.models.artifact import load_artifact

        art = load_artifact(args.model)
        if art.client_model is not None:
            raise SystemExit("--model with a client stage: benchmark its server part with --shape instead")
        return art.model, input_shape_of(art), art.card.get("activation_ranges")
    from medhe.models.autoencoder import build_latent_classifier

    shape = tuple(int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    model = build_latent_classifier(in_channels=shape[0], image_size=shape[1], width=args.width, num_outputs=14)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval(), shape, None


def _serve(folder: Path, backend: str) -> dict[str, Any]:
    """Child: plan file + keys + ciphertexts -> results, server seconds per image, peak RSS."""
    from medhe.he.ckks.planfile import load_server

    start = time.perf_counter()
    server = load_server((folder / "plan.bin").read_bytes(), backend=backend)
    load_s = time.perf_counter() - start
    keys = server.load_keys((folder / "keys.bin").read_bytes())
    times = []
    for path in sorted(folder.glob("input*.bin")):
        ct = path.read_bytes()
        start = time.perf_counter()
        out = server.infer(keys, ct)
        times.append(time.perf_counter() - start)
        (folder / path.name.replace("input", "output")).write_bytes(out)
    return {"backend": server.backend.name, "load_s": round(load_s, 2), "server_eval_s": [round(t, 2) for t in times],
            "server_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1x256x256")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--model")
    p.add_argument("--backend", default="native", choices=("native", "seal"))
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--poly-degree", type=int, help="force the ring (P1's table uses 32768)")
    p.add_argument("--scale-bits", type=int, help="force the scale (P1's table uses 36)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--serve", help=argparse.SUPPRESS)  # child mode: the folder to serve
    args = p.parse_args(argv)
    if args.serve:
        print(json.dumps(_serve(Path(args.serve), args.backend)))
        return 0

    import torch

    from medhe.he.ckks import CKKSClient, compile_plan
    from medhe.he.ckks.inspect import describe
    from medhe.he.ckks.planfile import dump_server
    from medhe.he.ckks.server import CKKSServerModel

    model, shape, ranges = _model(args)
    start = time.perf_counter()
    options = {k: v for k, v in (("poly_degree", args.poly_degree), ("scale_bits", args.scale_bits)) if v}
    plan = compile_plan(model, shape, ranges, **options)
    compile_s = time.perf_counter() - start
    info = describe(plan)
    rng = np.random.default_rng(1)
    xs = [(rng.random(shape) * 2 - 1).astype(np.float32) for _ in range(args.images)]
    with torch.no_grad():
        want = [model(torch.tensor(x)[None]).double().numpy()[0] for x in xs]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = CKKSServerModel(plan, backend="seal")
        (folder / "plan.bin").write_bytes(dump_server(server))
        client = CKKSClient(json.loads(json.dumps(server.spec())))
        del server
        client.keygen()
        keys = client.evaluation_keys()
        (folder / "keys.bin").write_bytes(keys)
        for i, x in enumerate(xs):
            (folder / f"input{i:04d}.bin").write_bytes(client.encrypt(x))
        child = subprocess.run([sys.executable, "-m", "medhe.he.ckks.blockbench", "--serve", str(folder),
                                "--backend", args.backend], capture_output=True, text=True, check=False)
        if child.returncode:
            sys.stderr.write(child.stderr)
            return child.returncode
        served = json.loads(child.stdout.strip().splitlines()[-1])
        errs = [float(np.abs(client.decrypt((folder / f"output{i:04d}.bin").read_bytes()) - w).max())
                for i, w in enumerate(want)]
    t = info["totals"]
    report = {"shape": list(shape), "width": args.width if not args.model else None, "model": args.model,
              "params": info["params"], "depth": info["depth"], "compile_s": round(compile_s, 1),
              "input_ciphertexts": t["input_ciphertexts"], "input_bytes_as_sent": t["input_bytes_as_sent"],
              "key_bytes_as_sent": t["key_bytes_as_sent"], "rotation_keys": t["rotation_keys"],
              "rotations": t["rotations"], "plaintext_products": t["products"], "plaintexts": t["plaintexts"],
              "plaintext_bytes": t["plaintext_bytes"], "predicted_ms": t["predicted_ms"], **served,
              "server_eval_median_s": float(np.median(served["server_eval_s"])),
              "max_abs_logit_err": max(errs), "choices": info["choices"]}
    text = json.dumps(report, indent=1)
    if args.json_out:
        from medhe import atomic

        atomic.write_text(args.json_out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
