"""``medhe demo`` (what ``make demo`` runs): the whole user story on the default model and data.

Plain evaluation of the shipped model on its full test set, then encrypted diagnosis of test images under CKKS:
the client encrypts, the server evaluates blind, the client decrypts — with plain and encrypted side by side.
"""

from __future__ import annotations

import argparse

import numpy as np

from medhe.textformat import human_bytes, table
from medhe.errors import MedheError
from medhe.he.scheme import SCHEMES, default_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="plain vs encrypted diagnosis with the default model",
                       description="Evaluate the default model on its test set, then diagnose test images under "
                                   "CKKS encryption and compare with plaintext.")
    p.add_argument("--model", help="shipped model name or model directory (default: the scheme's own, e.g. "
                                    + ", ".join(f"{s}: {default_model(s)}" for s in SCHEMES) + ")")
    p.add_argument("--scheme", default="ckks", choices=SCHEMES)
    p.add_argument("-n", "--images", type=int, default=16, help="test images to diagnose encrypted")
    p.add_argument("--data-dir")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medhe.cli.evaluate import evaluate, print_report
    from medhe.data.evalsplit import load_eval_data
    from medhe.he.evaluate import agreement, run_encrypted
    from medhe.he.scheme import compile_model
    from medhe.models.artifact import load_artifact
    from medhe.models.metrics import predictions, probabilities
    from medhe.models.predict import model_inputs, predict_logits

    if args.images < 1:
        raise MedheError(f"-n/--images must be at least 1, not {args.images}")
    args.model = args.model or default_model(args.scheme)
    from medhe.cli._paths import input_dir

    args.data_dir = input_dir(args.data_dir, "--data-dir")
    print(f"== 1. Plain evaluation of the shipped model {args.model!r} on its full test split")
    print_report(evaluate(args.model, "plain", data_dir=args.data_dir, progress=False))

    artifact = load_artifact(args.model)
    _, ds = load_eval_data(artifact, None, "test", args.images, args.data_dir)
    inputs = model_inputs(artifact, ds.images)
    plain = predict_logits(artifact.model, inputs)
    print(f"\n== 2. Encrypted diagnosis ({args.scheme.upper()}) of {len(inputs)} test images")
    print("   client: preprocess, encrypt (secret key stays here) -> server: evaluate on ciphertext -> "
          "client: decrypt")
    server = compile_model(artifact, args.scheme)  # each scheme's compile defaults to real encrypted execution
    params = server.spec().get("params", {})
    run_ = run_encrypted(server, inputs, progress=True)
    enc = run_["logits"]
    p_plain, p_enc = probabilities(artifact.task, plain), probabilities(artifact.task, enc)
    y_plain, y_enc = predictions(artifact.task, plain), predictions(artifact.task, enc)
    labels = artifact.labels
    rows = []
    for i in range(len(inputs)):
        truth = labels[int(ds.labels[i][0])] if ds.labels.shape[1] == 1 else "multi-label"
        yp, ye = np.atleast_1d(y_plain[i]), np.atleast_1d(y_enc[i])
        name = (lambda y: labels[int(y[0])]) if yp.size == 1 else (lambda y: ",".join(
            labels[j] for j in np.flatnonzero(y)) or "none")
        rows.append([i, truth, name(yp), f"{np.max(p_plain[i]):.3f}", name(ye), f"{np.max(p_enc[i]):.3f}",
                     f"{np.max(np.abs(enc[i] - plain[i])):.1e}"])
    print(table(["#", "truth", "plain", "p", "encrypted", "p", "|logit err|"], rows))
    lat = run_["latency_ms"]
    print(f"\nagreement {agreement(artifact.task, plain, enc):.3f}, max |logit error| "
          f"{float(np.max(np.abs(enc - plain))):.1e}")
    print(f"per image: encrypt {lat['encrypt']['median']:.0f} ms, server eval {lat['eval']['median']:.0f} ms, "
          f"decrypt {lat['decrypt']['median']:.1f} ms (medians); key generation {lat['keygen']['median']:.0f} ms")
    b = run_["bytes"]
    print(f"sent: input {human_bytes(b['input_ciphertext'])} per image, evaluation keys "
          f"{human_bytes(b['evaluation_keys'])} once; received {human_bytes(b['output_ciphertext'])} per image")
    if params:
        print("parameters: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in params.items() if not isinstance(v, (list, dict))))
    return 0
