"""Every shipped model's card names a command of this medhe that accepts its recorded options (no scripts/)."""

import importlib
import json
import shlex
from pathlib import Path

import pytest

from medhe.cli import build_parser
from medhe.models.artifact import PRETRAINED_DIR
from medhe.recipes import RECIPES

CARDS = sorted(PRETRAINED_DIR.glob("*/card.json"))


def _commands(card: dict) -> list[str]:
    training = card.get("training") or {}
    found = [training["command"]] if training.get("command") else []
    for value in training.values():
        if isinstance(value, dict) and value.get("command"):
            found.append(value["command"])
    return found


@pytest.mark.parametrize("path", CARDS, ids=[p.parent.name for p in CARDS])
def test_card_training_command_is_a_medhe_command(path):
    card = json.loads(path.read_text())
    commands = _commands(card)
    assert commands, f"{path.parent.name} records no training command"
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "medhe", command
        if words[1] == "recipe":
            module = importlib.import_module(f"medhe.recipes.{RECIPES[words[2]][0]}")
            module.build_parser().parse_args(words[3:])
        else:
            build_parser().parse_args(words[1:])


def test_recipes_are_package_modules_not_path_hacks():
    root = Path(importlib.import_module("medhe.recipes").__file__).parent
    for name, (module, _) in RECIPES.items():
        text = (root / f"{module}.py").read_text()
        assert "sys.path" not in text and "scripts/" not in text, name
        assert importlib.import_module(f"medhe.recipes.{module}").build_parser().prog == f"medhe recipe {name}"
    assert not list((root.parents[2] / "scripts").glob("*.py"))
