"""``medhe recipe NAME [options]``: the training recipes of shipped models (``medhe.recipes``)."""

from __future__ import annotations

import argparse
import importlib


def register(sub: argparse._SubParsersAction) -> None:
    from medhe.recipes import RECIPES

    p = sub.add_parser("recipe", help="training recipes of the shipped models beyond medhe train",
                       description="Run a recipe that trains (or checks the data of) a shipped model; each card's "
                                   "training.command names the recipe and options that made it.")
    p.add_argument("name", choices=sorted(RECIPES), help="; ".join(f"{k}: {v[1]}" for k, v in RECIPES.items()))
    p.add_argument("options", nargs=argparse.REMAINDER, help="the recipe's own options (medhe recipe NAME --help)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medhe.recipes import RECIPES

    module = importlib.import_module(f"medhe.recipes.{RECIPES[args.name][0]}")
    return int(module.main(list(args.options)) or 0)
