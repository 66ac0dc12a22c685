"""``medhe keygen`` and ``medhe encrypt-model``: the key holder's side of an encrypted model (P3).

The hospital makes one CKKS key set (the secret key stays in KEYDIR, mode 0600) and encrypts the model's weights
under it into ENCDIR, which it hands to the compute server (``medhe serve --encrypted-model ENCDIR``).
"""

from __future__ import annotations

import argparse

from medhe.textformat import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="make the CKKS key set an encrypted model is bound to (key holder)",
                       description="Compile MODEL for CKKS and generate one SEAL key set for its encrypted-weight "
                                   "plan into KEYDIR: secret.key (mode 0600, never leaves KEYDIR), the public "
                                   "evaluation keys and their id. Then run medhe encrypt-model.")
    p.add_argument("--model", required=True, help="shipped model name or model directory")
    p.add_argument("--out", required=True, metavar="KEYDIR", help="new, empty folder for the key set")
    p.add_argument("--poly-degree", type=int, choices=(8192, 16384, 32768),
                   help="CKKS ring degree (default: the model's own plan); encrypted weights add fresh encryption "
                        "noise to every weight, so a larger ring with --scale-bits buys precision")
    p.add_argument("--scale-bits", type=int, metavar="BITS",
                   help="CKKS scale in bits (default: the ring's preset); still checked for 128-bit security")
    p.set_defaults(handler=run_keygen)

    p = sub.add_parser("encrypt-model", help="encrypt a model's weights under a KEYDIR's key (key holder)",
                       description="Encrypt every weight the model's CKKS plan uses (weight diagonals, biases, "
                                   "folded BatchNorm shifts, activation constants) under KEYDIR's secret key into "
                                   "ENCDIR: ciphertexts plus a public spec and program, no plaintext weight. Give "
                                   "ENCDIR to the compute server: medhe serve --encrypted-model ENCDIR.")
    p.add_argument("--model", required=True, help="shipped model name or model directory (as given to keygen)")
    p.add_argument("--keys", required=True, metavar="KEYDIR", help="folder made by medhe keygen")
    p.add_argument("--out", required=True, metavar="ENCDIR", help="new, empty folder for the encrypted model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_encrypt)


def _hook(name: str):
    from medhe.he.scheme import encrypted_weight_scheme, scheme_hook

    return scheme_hook(encrypted_weight_scheme(), name)


def run_keygen(args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("poly_degree", args.poly_degree), ("scale_bits", args.scale_bits)) if v}
    artifact, keys = _hook("make_keydir")(args.model, args.out, options)
    secret_file = _hook("KEYDIR_SECRET_FILE")
    enc = keys.spec["encrypted_model"]
    print(f"key set {keys.key_id} for {artifact.name!r} written to {keys.path}")
    print(f"  secret key: {keys.path / secret_file} (mode 0600; it never leaves this folder)")
    params = keys.spec["params"]
    print(f"  CKKS N={params['poly_degree']}, primes {params['prime_bits']}, depth {keys.spec['depth']}")
    print(f"  evaluation keys: {human_bytes(len(keys.galois) + len(keys.relin))} "
          f"(relinearization up to level {keys.spec['key_levels']['relin']})")
    print(f"  next: medhe encrypt-model --model {args.model} --keys {args.out} --out ENCDIR "
          f"({enc['weight_ciphertexts']} weight ciphertexts, about {human_bytes(enc['bytes'])})")
    return 0


def run_encrypt(args: argparse.Namespace) -> int:
    artifact, keys, spec = _hook("encrypt_model")(args.model, args.keys, args.out, progress=not args.no_progress)
    enc = spec["encrypted_model"]
    print(f"encrypted model {artifact.name!r} written to {args.out}: {enc['weight_ciphertexts']} weight "
          f"ciphertexts ({human_bytes(enc['bytes'])}) under key set {keys.key_id}")
    print(f"  serve it with: medhe serve --encrypted-model {args.out}")
    return 0
