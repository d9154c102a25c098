"""One short message for a config that does not parse, instead of jsonargparse's usage.

jsonargparse reports a mistyped key of a task or data module (``--model.lrr=3``) as
"Does not validate against any of the Union subtypes", a list of every subtype it tried
and the whole 45-line usage: the line that matters ("Option 'lrr' is not accepted") is
buried in it, with no suggestion. jsonargparse has no hook for its messages, so
:func:`explain` reads them (their wording is pinned by tests/test_usage.py) and says,
in two or three lines: the key, where it came from (a flag or a config file) and the
nearest valid keys, or for a bad value, what was expected. A message it does not
recognise is passed on unchanged, less the union noise.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlit.errors import ConfigError


class UsageError(ConfigError):
    """The command line or a config file names a key that does not exist, or gives a key
    a value of the wrong type."""


def command() -> str:
    """The command the user ran, as they would type it: ``python -m medlit.fit`` (argparse
    would say ``fit.py``)."""
    main = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if main is not None and main.suffix == ".py" and main.parent.name == "medlit":
        return f"python -m medlit.{main.stem}"
    if main is not None and main.name == "__main__.py":
        return f"python -m {main.parent.name}"
    return main.name if main is not None else "medlit"


def _load_class(path: str) -> type | None:
    if "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def arguments(cls: Any) -> list[str]:
    """A constructor's argument names, each settings group's fields as ``group.field``."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    out = []
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name == "self":
            continue
        out.append(name)
        if dataclasses.is_dataclass(p.default):
            out += [f"{name}.{f.name}" for f in dataclasses.fields(p.default)]
    return out


def _configs(args: Sequence[str]) -> list[tuple[str, Any]]:
    """(file name or "--config", content) of every ``--config`` in ``args``."""
    import yaml

    out = []
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--config" and i + 1 < len(args) else None
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else value
        if value is None:
            continue
        try:
            path = Path(value)
            if len(value) < 4096 and "\n" not in value and path.is_file():
                out.append((value, yaml.safe_load(path.read_text())))
            else:  # the YAML itself (a config whose keys medlit upgraded is passed so)
                out.append(("--config", yaml.safe_load(value)))
        except (OSError, yaml.YAMLError):
            continue
    return out


def _lookup(content: Any, dotted: str) -> bool:
    """Whether a config's content sets ``dotted`` (``model.lrr``), with or without the
    ``init_args`` level of a class."""
    node = content
    for part in dotted.split("."):
        if isinstance(node, dict) and "init_args" in node and part not in node:
            node = node["init_args"]
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def source(key: str, args: Sequence[str]) -> str:
    """Where ``key`` was given: the flag as typed, or the config file that sets it."""
    head, _, rest = key.partition(".")
    spellings = [f"--{key}"] + ([f"--{head}.init_args.{rest}"] if rest else [])
    for i, arg in reversed(list(enumerate(args))):  # the last one given wins
        for flag in spellings:
            if arg == flag:
                value = args[i + 1] if i + 1 < len(args) else ""
                return f"flag {flag} {value}".rstrip()
            if arg.startswith(flag + "="):
                return f"flag {arg}"
    for name, content in reversed(_configs(args)):  # the last one wins, as when parsing
        if _lookup(content, key):
            return "the config" if name == "--config" else f"config file {name}"
    return "the command line"


def _class_named(key: str, args: Sequence[str]) -> type | None:
    """The class ``model`` / ``data`` (``key``) names, from the flags or the configs."""
    path = None
    for _, content in _configs(args):
        node = content.get(key) if isinstance(content, dict) else None
        if isinstance(node, dict) and isinstance(node.get("class_path"), str):
            path = node["class_path"]
        elif isinstance(node, str):
            path = node
    for i, arg in enumerate(args):
        for flag in (f"--{key}", f"--{key}.class_path"):
            if arg == flag and i + 1 < len(args):
                path = args[i + 1]
            elif arg.startswith(flag + "="):
                path = arg.split("=", 1)[1]
    if path and "." not in path:
        short = {"model": "medlit.tasks", "data": "medlit.datamodules"}.get(key)
        path = f"{short}.{path}" if short else path
    return _load_class(path) if path else None


def _nearest(word: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    close = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    if not close:  # a key typed without its group (batch_size for loader.batch_size)
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == word.rsplit(".", 1)[-1]]
    return close[:n]


def _unknown(prefix: str, name: str, candidates: Sequence[str], args: Sequence[str], owner: str):
    key = f"{prefix}.{name}" if prefix else name
    near = _nearest(name, candidates)
    hint = (
        "did you mean " + " or ".join(f"{prefix}.{c}" if prefix else c for c in near) + "?"
        if near
        else f"{owner} takes: {', '.join(candidates[:20])}{' ...' if len(candidates) > 20 else ''}"
    )
    return f"unknown key {key} (from {source(key, args)}): {hint}"


def _trainer_arguments() -> list[str]:
    from pytorch_lightning import Trainer

    return arguments(Trainer)


def explain(message: str, args: Sequence[str], options: Sequence[str] = ()) -> str:
    """jsonargparse's error ``message`` for ``args``, said in a few lines (see the module
    docstring); ``options``: the parser's top-level option strings."""
    text = message.strip()
    help_line = f"(all options: {command()} CONFIG --help)"
    # A class's argument: --model.lrr / --data.loader.batch_sizee / a bad value.
    klass = re.search(r"Problem with given class_path '([^']+)':\s*(.*)", text, re.S)
    outer = re.match(r'Parser key "([^"]+)":', text)
    if klass and outer:
        prefix, cls_path, inner = outer.group(1), klass.group(1), klass.group(2)
        inner = inner.split("\n    - Expected a <class 'NoneType'>")[0]
        cls = _load_class(cls_path)
        owner = cls.__name__ if cls is not None else cls_path
        candidates = arguments(cls) if cls is not None else []
        if m := re.match(r"Option '([^']+)' is not accepted", inner.strip()):
            return f"{_unknown(prefix, m.group(1), candidates, args, owner)}\n{help_line}"
        if m := re.match(r"unrecognized arguments: --([^=\s]+)", inner.strip()):
            return f"{_unknown(prefix, m.group(1), candidates, args, owner)}\n{help_line}"
        if m := re.match(r'Parser key "([^"]+)":\s*(.*)', inner.strip(), re.S):
            return _bad_value(f"{prefix}.{m.group(1)}", m.group(2), args, owner)
    if m := re.match(r"Group '([^']+)' does not accept option '([^']+)'", text):
        group, name = m.groups()
        candidates = _trainer_arguments() if group == "trainer" else []
        return f"{_unknown(group, name, candidates, args, group)}\n{help_line}"
    if m := re.match(r"[Uu]nrecognized arguments: --([^=\s]+)", text):
        name = m.group(1)
        head, _, rest = name.partition(".")
        cls = _class_named(head, args) if rest else None
        if cls is not None:  # --model.lrr given before a class was known
            rest = rest.removeprefix("init_args.")
            unknown = _unknown(head, rest, arguments(cls), args, cls.__name__)
        elif head == "trainer" and rest:
            unknown = _unknown("trainer", rest, _trainer_arguments(), args, "the trainer")
        else:  # every key: the top-level options, and the task's and data module's
            keys = {o.removeprefix("--") for o in options if o.startswith("--")}
            keys = {k for k in keys if not k.endswith(".help") and k != "print_shtab"}
            for group in ("model", "data"):
                if (named := _class_named(group, args)) is not None:
                    keys |= {f"{group}.{a}" for a in arguments(named)}
            tops = sorted(k for k in keys if "." not in k)
            near = _nearest(name, sorted(keys))
            unknown = f"unknown key {name} (from {source(name, args)}): " + (
                f"did you mean {' or '.join(near)}?" if near else f"the keys: {', '.join(tops)}"
            )
        return f"{unknown}\n{help_line}"
    if outer and (m := re.search(r"Given value: (.*)$", text, re.M)):
        errors = [
            ln.strip().removeprefix("- ")
            for ln in text.splitlines()
            if ln.strip().startswith("- ") and "NoneType" not in ln
        ]
        return _bad_value(outer.group(1), "\n".join(errors) or text, args, "")
    # Not recognised: jsonargparse's own words, less the Union subtype listing.
    kept = [
        ln for ln in text.splitlines() if not ln.strip().startswith(("Subtypes:", "Given value"))
    ]
    return "\n".join(kept)


def _bad_value(key: str, problem: str, args: Sequence[str], owner: str) -> str:
    problem = " ".join(problem.split())
    where = source(key, args)
    if m := re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", problem):
        choices = [c.strip().strip("'\"") for c in m.group(1).split(",")]
        given = m.group(2).strip()
        near = _nearest(given, choices, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"{key}={given} (from {where}): choose one of {', '.join(choices)}{hint}"
    problem = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", problem)
    return f"{key} (from {where}): {problem}"
