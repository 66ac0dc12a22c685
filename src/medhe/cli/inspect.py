"""``medhe inspect MODEL --scheme ckks``: the compiled plan layer by layer (layouts, ciphertexts, rotations, levels,
predicted time and bytes) without running anything encrypted."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a model's encrypted plan costs, layer by layer",
                       description="Compile MODEL for the scheme (no keys, no encryption) and print per layer: "
                                   "operation, layout (ciphertexts x slots, channel/space blocking), rotations, "
                                   "levels, predicted milliseconds and bytes; then totals, parameters, security.")
    p.add_argument("model", help="shipped model name or model directory")
    p.add_argument("--scheme", choices=("ckks",), default="ckks")
    p.add_argument("--poly-degree", type=int, help="force the ring degree N (still 128-bit checked)")
    p.add_argument("--key-switching", choices=("seal", "hybrid"),
                   help="the evaluation keys' format: seal (SEAL's: one special prime, a digit per data prime) or "
                        "hybrid (issue 29: a few digits and several special primes chosen by the planner, keys "
                        "several times smaller; evaluated by the native runtime only). Default: the card's "
                        "scheme_options, else seal")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medhe.he.scheme import scheme_hook
    from medhe.models.artifact import load_artifact

    inspect_model = scheme_hook(args.scheme, "inspect_model")  # PlanError naming the scheme if it has none
    art = load_artifact(args.model)
    options = dict((art.card.get("scheme_options") or {}).get(args.scheme) or {})
    if args.poly_degree:
        options["poly_degree"] = args.poly_degree
    if args.key_switching:
        options["key_switching"] = args.key_switching
    info = inspect_model(art, **options)
    info["model"] = art.card.get("name", args.model)
    info["card"] = card_block(art.card)
    render = scheme_hook(args.scheme, "render_inspection")
    print(json.dumps(info, indent=1) if args.json else card_header(info["card"]) + "\n" + render(info))
    return 0


def card_block(card: dict) -> dict:
    """The card v2 fields that say which model this plan is (``"unknown"`` for a card from before v2)."""
    from medhe.models.modelcard import parts, summary

    fields = summary(card)
    data = fields["training_data"] if isinstance(fields["training_data"], dict) else {}
    return {"version": fields["version"], "license": fields["license"], "created": fields["created"],
            "code_revision": fields["code_revision"], "intended_use": fields["intended_use"],
            "training_data": [{"part": label, "dataset": p.get("dataset"), "n": p.get("n"), "sha256": p.get("sha256")}
                              for label, p in parts(data)]}


def card_header(block: dict) -> str:
    lines = [f"card: version {block['version']}, license {block['license']}, created {block['created']}, "
             f"code {block['code_revision']}"]
    lines += [f"  trained on ({d['part']}): {d['dataset']}, {d['n']} images, sha256 {d['sha256']}"
              for d in block["training_data"]]
    lines.append(f"  intended use: {block['intended_use']}")
    return "\n".join(lines)
