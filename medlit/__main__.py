"""The ``medlit`` command: ``medlit <command> [arguments]`` runs ``python -m medlit.<command>``
with the same arguments (``medlit fit CONFIG``, ``medlit predict CONFIG --ckpt_path ...``).

Commands: fit, cv, sweep, check, evaluate, predict, export, generate, tracking, deploy; ``medlit`` alone
(or ``--help``) lists them with what each does.
"""

from __future__ import annotations

import importlib
import runpy
import sys

# command -> module run as ``python -m`` (its ``__main__`` block), in the order listed
# (tracking's docstring is its two forms: its summary is written here)
SUMMARIES = {"tracking": "Sync spooled MLflow calls (sync) and list an experiment's runs (runs)."}
COMMANDS = {
    "fit": "medlit.fit",
    "cv": "medlit.cv",
    "sweep": "medlit.sweep",
    "check": "medlit.check",
    "evaluate": "medlit.evaluate",
    "predict": "medlit.predict",
    "export": "medlit.export",
    "generate": "medlit.generate",
    "tracking": "medlit.tracking",
    "deploy": "medlit.deploy",
}
# Commands that run without the train extra (torch, Lightning, ...).
WITHOUT_TRAINING = {"deploy"}


def _summary(module: str) -> str:
    """The first line of a command module's docstring (no heavy import: the docstring
    is read from the source)."""
    import ast
    from importlib.util import find_spec

    spec = find_spec(module)
    origin = spec.origin if spec is not None else None
    if origin is None:
        return ""
    if origin.endswith("__init__.py"):
        main = origin.replace("__init__.py", "__main__.py")
        origin = main if importlib.util.find_spec(f"{module}.__main__") else origin
    with open(origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    for line in doc.splitlines():
        if line.strip() and "python -m" not in line:
            return line.strip()
    return ""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: medlit <command> [arguments]   (the same as python -m medlit.<command>)", ""]
    lines += [
        f"  {name:<{width}}  {SUMMARIES.get(name) or _summary(module)}"
        for name, module in COMMANDS.items()
    ]
    lines += ["", "medlit <command> --help: the command's own arguments"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"medlit: no command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[name]
    from importlib.util import find_spec

    if name not in WITHOUT_TRAINING and find_spec("pytorch_lightning") is None:
        print(
            f"medlit {name} needs the training stack: pip install 'medlit[train]' "
            "(a deployment without it runs exported networks with medlit deploy)",
            file=sys.stderr,
        )
        return 2
    sys.argv = [f"medlit {name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
