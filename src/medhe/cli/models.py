"""``medhe models [MODEL ...]``: the shipped models (or given model directories) with their card v2 fields.

One line per model says which version, license, data and code a model is; naming a model prints its whole v2
record (intended use, limitations, training-data fingerprints), and ``--verify-data`` recomputes those fingerprints
from the data at hand, so a hospital can check it holds the images a model was trained on (docs/model-cards.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

AUTOENCODER_CARD = "autoencoder.json"  # medhe.models.train_autoencoder.CARD, without importing torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list models with version, license, training data and code revision",
                       description="Without MODEL: every shipped model, one line each. With MODEL (a shipped name or "
                                   "a model directory): its card v2 fields in full. Cards from before v2 show "
                                   "'unknown' for what they lack.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="shipped model name or model directory")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--verify-data", action="store_true",
                   help="recompute each training-data SHA-256 from the data folder and compare with the card "
                        "(exit status 1 on a mismatch)")
    p.add_argument("--data-dir", help="folder with dataset files (default: $MEDHE_DATA or ~/.medhe/data)")
    p.set_defaults(handler=run)


def _folders(names: list[str]) -> list[Path]:
    from medhe.models.artifact import PRETRAINED_DIR, resolve_model_dir

    if names:
        out = []
        for name in names:
            shipped = PRETRAINED_DIR / name
            out.append(shipped if (shipped / AUTOENCODER_CARD).is_file() else resolve_model_dir(name))
        return out
    return sorted(p for p in PRETRAINED_DIR.iterdir()
                  if (p / "card.json").is_file() or (p / AUTOENCODER_CARD).is_file())


def record(folder: Path) -> dict[str, Any]:
    """A model's listing record: identity, the v2 fields (``"unknown"`` where missing) and what it is for."""
    from medhe.errors import ArtifactError
    from medhe.models.artifact import read_card
    from medhe.models.modelcard import missing_fields, summary

    if (folder / AUTOENCODER_CARD).is_file() and not (folder / "card.json").is_file():
        try:
            card = json.loads((folder / AUTOENCODER_CARD).read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{folder}: {AUTOENCODER_CARD} is not readable JSON ({exc})") from None
        card.setdefault("name", folder.name)
        kind, task, scheme = "autoencoder (client stage)", "-", "-"
    else:
        card = read_card(folder)
        kind, task = "classifier", card["task"]
        scheme = str((card.get("scheme_options") or {}).get("default_scheme") or "ckks")
    fields = summary(card)
    return {"name": str(card["name"]), "path": str(folder), "kind": kind, "task": task, "default_scheme": scheme,
            **fields, "code_revision_source": card.get("code_revision_source", "unknown"),
            "missing_v2_fields": missing_fields(card)}


def _data_line(data: Any) -> str:
    from medhe.models.modelcard import parts

    if not isinstance(data, dict):
        return "unknown"
    entries = [p for label, p in parts(data) if not label.startswith("client_stage")]
    return " + ".join(f"{p.get('dataset')} ({p.get('n', '?')})" for p in entries) or "unknown"


def render_list(records: list[dict[str, Any]]) -> str:
    from medhe.textformat import table

    rows = [[r["name"], r["version"], r["task"], r["default_scheme"], _data_line(r["training_data"]), r["license"],
             r["created"], str(r["code_revision"])[:12]] for r in records]
    return table(["model", "version", "task", "scheme", "trained on (images)", "license", "created", "code"], rows)


def render_one(r: dict[str, Any]) -> str:
    from medhe.models.modelcard import parts

    lines = [f"{r['name']} v{r['version']} ({r['kind']}, {r['task']}, default scheme {r['default_scheme']})",
             f"  path:          {r['path']}",
             f"  license:       {r['license']}",
             f"  created:       {r['created']}",
             f"  code revision: {r['code_revision']} ({r['code_revision_source']})",
             f"  intended use:  {r['intended_use']}"]
    if r["missing_v2_fields"]:
        lines.append(f"  card predates v2: no {', '.join(r['missing_v2_fields'])}")
    data = r["training_data"]
    if isinstance(data, dict):
        lines.append("  training data:")
        for label, p in parts(data):
            sizes = p.get("sizes") or {}
            lines.append(f"    {label}: {p.get('dataset')} {'+'.join(p.get('trained_on') or [])} "
                         f"({p.get('n', '?')} images; splits {', '.join(f'{k} {v}' for k, v in sizes.items())})")
            lines.append(f"      sha256 {p.get('sha256')} ({p.get('hash_scheme', 'unknown scheme')})")
            if p.get("terms"):
                lines.append(f"      terms: {p['terms']}")
    limits = r["limitations"] if isinstance(r["limitations"], list) else [r["limitations"]]
    lines.append("  limitations:")
    lines += [f"    - {item}" for item in limits]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    records = [record(f) for f in _folders(args.models)]
    status = 0
    if args.verify_data:
        from medhe.cli._paths import input_dir
        from medhe.models.modelcard import verify

        data_dir = input_dir(args.data_dir, "--data-dir")
        for r in records:
            rows = verify(r["training_data"], data_dir) if isinstance(r["training_data"], dict) else []
            r["data_check"] = rows
            status = max(status, int(any(row["match"] is False for row in rows)))
    if args.json:
        print(json.dumps(records if args.models else {"models": records}, indent=2))
        return status
    print("\n\n".join(render_one(r) for r in records) if args.models else render_list(records))
    if args.verify_data:
        print("\ntraining-data fingerprints recomputed from the data folder:")
        for r in records:
            for row in r["data_check"]:
                state = {True: "matches", False: "DIFFERS", None: f"not checked ({row.get('why', 'no data')})"}
                print(f"  {r['name']} {row['part']} {row['dataset']}: {state[row['match']]}")
    return status
