"""``--config FILE.toml`` for ``medhe serve`` and ``medhe ui``: a file of flag values, the command line overriding it.

Why the keys are the long flag names (``max_key_bytes = "4G"`` for ``--max-key-bytes 4G``): an operator who knows
the flags knows the file, and ``--help`` documents both. Repeatable flags take a list under their plural name too
(``models = ["pneumoniamnist", "covid-cxr:paillier"]`` for ``--model``). The file only changes the defaults the
command line is parsed with, so a flag given on the command line always wins; a repeatable flag given there
replaces the file's list instead of extending it. An unknown key or a wrong type is one error line naming the key
and the file, before anything starts.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from pathlib import Path
from typing import Any

from medhe.errors import MedheError

FLAG = "--config"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(FLAG, metavar="FILE.toml",
                        help="read option values from a TOML file whose keys are the long flag names with '_' "
                             "(port = 8000, log_format = \"json\"); flags given here override it")


class _FileList(list):
    """A repeatable flag's list from the file: the first use of the flag on the command line starts a new list
    (argparse's append copies its default with ``copy.copy``), so the command line replaces the file's list."""

    def __copy__(self) -> list:
        return []


def config_path(argv: list[str], options: list[str] = ()) -> str | None:
    """The value of the last ``--config FILE`` / ``--config=FILE`` in ``argv`` (a subcommand's arguments); like
    argparse, an abbreviation counts when no other of the subcommand's ``options`` starts with it."""
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        flag, eq, value = token.partition("=")
        if not (flag == FLAG or (len(flag) > 2 and FLAG.startswith(flag)
                                 and not any(o.startswith(flag) for o in options if o != FLAG))):
            continue
        if eq:
            found = value
        elif i + 1 < len(argv):
            found = argv[i + 1]
    return found


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """Before ``parser.parse_args(argv)``: when the subcommand in ``argv`` has ``--config`` and it is given, make
    the file's values that subcommand's defaults. Returns the file applied (``None``: none)."""
    command = next((t for t in argv if not t.startswith("-")), None)
    sub = _subparser(parser, command)
    if sub is None or not any(FLAG in a.option_strings for a in sub._actions):
        return None
    rest = argv[argv.index(command) + 1:]
    path = config_path(rest, [o for a in sub._actions for o in a.option_strings])
    if path is None:
        return None
    values = load_config(path, sub)
    for action in sub._actions:
        if action.dest in values:
            action.required = False  # e.g. ui's --server, given by the file
    sub.set_defaults(**values)
    return path


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def _keys(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> the option it sets: each long flag without ``--``, ``-`` as ``_``; repeatable ones also plural."""
    keys: dict[str, argparse.Action] = {}
    for action in sub._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "config") or isinstance(action, argparse._VersionAction):
            continue
        for flag in longs:
            key = flag[2:].replace("-", "_")
            keys[key] = action
            if isinstance(action, argparse._AppendAction) and not key.endswith("s"):
                keys[key + "s"] = action
    return keys


def load_config(path: str | Path, sub: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's values as ``dest -> value`` for ``sub``, checked and converted as the flags would be."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise MedheError(f"config file not found: {path}") from None
    except OSError as exc:
        raise MedheError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MedheError(f"{path}: not valid TOML ({exc})") from None
    keys = _keys(sub)
    command = sub.prog.split()[-1]
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in data.items():
        norm = key.replace("-", "_")
        action = keys.get(norm)
        if action is None:
            near = difflib.get_close_matches(norm, list(keys), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise MedheError(f"{path}: unknown key {key!r}{hint}; keys are the long flags of `medhe {command} "
                             "--help` with '_' for '-'")
        if action.dest in given:
            raise MedheError(f"{path}: {key!r} and {given[action.dest]!r} set the same option; keep one")
        given[action.dest] = key
        values[action.dest] = _convert(path, key, action, value)
    return values


def _convert(path: Path, key: str, action: argparse.Action, value: Any) -> Any:
    def bad(expected: str) -> MedheError:
        return MedheError(f"{path}: {key} = {_show(value)}: expected {expected}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad("a list of strings")
        return _FileList(_typed(path, key, action, v, bad) for v in items)
    if action.nargs == "?" and value is True:
        return action.const  # e.g. ray = true: --ray without an address
    return _typed(path, key, action, value, bad)


def _typed(path: Path, key: str, action: argparse.Action, value: Any, bad) -> Any:
    kind = action.type
    if isinstance(value, (dict, list)):
        raise bad("a single value, not a " + ("table" if isinstance(value, dict) else "list"))
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif kind is None or kind is str:
        if not isinstance(value, str):
            raise bad("a string")
    else:  # a converter such as serve's sizes ("64M" or 67108864)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("a string or a number")
        try:
            value = kind(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise MedheError(f"{path}: {key} = {_show(value)}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise bad("one of " + ", ".join(repr(c) for c in action.choices))
    return value


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, bool) else str(value).lower()
    return text if len(text) <= 60 else text[:57] + "..."
