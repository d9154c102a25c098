"""What a medlit command prints for ``--help`` (or ``-h``, or nothing at all) without a config.

LightningCLI's ``--help`` without a config lists only its own 150 trainer options, and
says nothing of medlit's tasks, data modules or experiments. A command that takes a
config calls :func:`maybe_overview` first; without a config it prints what the command
does, its usage, the tasks and data modules (found in :mod:`medlit.tasks` and
:mod:`medlit.datamodules`, each with its docstring's first paragraph), the shipped
experiments, and how to see the options of a class or of a config. Lines fit 100 columns.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

WIDTH = 100

# Each command's arguments after ``python -m medlit.<command>``; what it does comes from
# its module docstring.
USAGE = {
    "medlit.fit": "CONFIG [--key=value ...]",
    "medlit.predict": "CONFIG --ckpt_path=CKPT [--ckpt_path=CKPT2 ...] | --cv_run=RUN_ID "
    "--input=PATH --output=DIR [--device=auto] [--batch_size=N] [--num_workers=N] "
    "[--postprocessing=auto|none|FILE] [--uncertainty[=entropy|variance]] [--explain=REGION] "
    "[--no_progress] "
    "[--key=value ...]",
    "medlit.evaluate": "CONFIG --ckpt_path=CKPT [--ckpt_path=CKPT2 ...] | --cv_run=RUN_ID "
    "[--split=val|test] [--postprocessing=auto|none|FILE] [--key=value ...]",
    "medlit.generate": "CONFIG --ckpt_path=CKPT --output=DIR [--num_images=100] [--seed=0] "
    "[--key=value ...]",
    "medlit.check": "CONFIG [--key=value ...] [--deep]",
    "medlit.export": "CONFIG --ckpt_path=CKPT [--format=onnx|torch-export] --output=FILE "
    "[--key=value ...]",
    "medlit.cv": "CONFIG --num_folds=K [--folds=0,2] [--cv_checkpoint=last|best] "
    "[--postprocessing_metric=dice|jaccard|lesion_dice] [--key=value ...]",
    "medlit.sweep": "SWEEP.yaml [--n-trials N] [--timeout S] [--storage URL] [--workers K] "
    "[--key value ...]",
}

HELP = ("-h", "--help")


def names_config(argv: Sequence[str]) -> bool:
    """Whether ``argv`` gives a config: ``--config``/``-c``, or a file named on its own, that
    is first (``CONFIG ...``), a ``.yaml``/``.yml``/``.json``, or a word that is not the
    value of the option before it (``medlit.predict --ckpt_path=X CONFIG``)."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") or arg.startswith(("--config=", "-c=")):
            return True
        if arg.startswith("-"):
            continue
        before = argv[i - 1] if i else ""
        if not before or arg.endswith((".yaml", ".yml", ".json")):
            return True
        if not before.startswith("-") or "=" in before:
            return True
    return False


def summary(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring, on one line, less reST's double
    backquotes."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "")


def classes(package: str, base: type) -> list[type]:
    """The concrete ``base`` subclasses that ``package`` exports, in its ``__all__`` order:
    the ones a config names as ``class_path``."""
    module = importlib.import_module(package)
    found = (getattr(module, name) for name in getattr(module, "__all__", dir(module)))
    return [c for c in found if isinstance(c, type) and issubclass(c, base) and c is not base]


def experiments_dir() -> Path | None:
    """``experiments/`` beside the medlit package (a checkout or an editable install);
    None for an installed wheel, which ships none."""
    found = Path(__file__).resolve().parent.parent / "experiments"
    return found if found.is_dir() else None


def shown(path: Path) -> str:
    """``path`` as the user would type it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def first_comment(path: Path) -> str:
    """The text of a YAML file's first line when it is a comment (each shipped config
    starts with one saying what it trains), else ''."""
    try:
        with path.open(encoding="utf-8") as f:
            line = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return line.lstrip("#").strip() if line.startswith("#") else ""


def shipped(sweeps: bool) -> list[Path]:
    """The shipped experiment configs (``sweeps=False``) or sweep files (``True``)."""
    root = experiments_dir()
    if root is None:
        return []
    return sorted(
        p for p in root.rglob("*.yaml") if (p.relative_to(root).parts[0] == "sweeps") == sweeps
    )


def table(rows: list[tuple[str, str]], indent: int = 2) -> list[str]:
    """Two columns, the second wrapped (or, for long first columns, cut) to :data:`WIDTH`."""
    if not rows:
        return []
    left = min(max(len(a) for a, _ in rows), 44)
    out = []
    for a, b in rows:
        head = " " * indent + a.ljust(left) + "  "
        if len(head) > indent + left + 2:  # a long name: its text on the next line
            out.append(head.rstrip())
            head = " " * (indent + left + 2)
        out += textwrap.wrap(
            b, WIDTH, initial_indent=head, subsequent_indent=" " * (indent + left + 2)
        ) or [head.rstrip()]
    return out


def one_line(text: str, room: int) -> str:
    """``text`` cut at a word to ``room`` characters, with '...' where it was cut."""
    return text if len(text) <= room else textwrap.shorten(text, room, placeholder=" ...")


def overview(command: str) -> str:
    """The text ``python -m <command> --help`` prints without a config."""
    from medlit.datamodules.base import BaseDataModule
    from medlit.tasks.base import BaseTask

    run = f"python -m {command}"
    what = (importlib.import_module(command).__doc__ or "").strip().split("\n")[0]
    lines = [what, "", "usage:"]
    lines += textwrap.wrap(
        f"{run} {USAGE.get(command, 'CONFIG [--key=value ...]')}",
        WIDTH,
        initial_indent="  ",
        subsequent_indent="      ",
        break_on_hyphens=False,
    )
    sweep = command == "medlit.sweep"
    if sweep:
        lines += ["", "A sweep file names the base experiment (a config of the ones below), the"]
        lines += ["objective, the search space, the budget, the sampler and the pruner."]
    tasks = [(f"medlit.tasks.{c.__name__}", summary(c)) for c in classes("medlit.tasks", BaseTask)]
    data = [
        (f"medlit.datamodules.{c.__name__}", summary(c))
        for c in classes("medlit.datamodules", BaseDataModule)
    ]
    lines += ["", "Tasks (model.class_path):", *table(tasks)]
    lines += ["", "Data modules (data.class_path):", *table(data)]
    configs = shipped(sweeps=sweep)
    if configs:
        rows = [(shown(p), first_comment(p)) for p in configs]
        left = min(max(len(a) for a, _ in rows), 44)
        rows = [(a, one_line(b, WIDTH - left - 4)) for a, b in rows]
        lines += ["", "Shipped sweeps:" if sweep else "Shipped experiments:", *table(rows)]
    fit = "python -m medlit.fit"
    # Short labels: each command stays on one line, to be copied whole.
    options = [
        ("a task's options:", f"{fit} --model.help medlit.tasks.SegmentationTask"),
        ("a data module's:", f"{fit} --data.help medlit.datamodules.BraTSDataModule"),
        ("an experiment's:", f"{fit} CONFIG --help"),
        ("resolved config:", f"{fit} CONFIG --print_config"),
        ("shell completion:", f"{fit} --print_completion bash  (or zsh; README)"),
    ]
    if sweep:
        options.insert(0, ("sweep options:", f"{run} SWEEP.yaml --help"))
    lines += ["", "Options (the same config keys serve every medlit command):", *table(options)]
    return "\n".join(lines)


def maybe_overview(command: str, argv: Sequence[str]) -> bool:
    """Print :func:`overview` and return True when ``argv`` is empty, or asks for help
    (``-h``/``--help``) and gives no config (:func:`names_config`); else False, and the
    command goes on. With a config, ``--help`` is the parser's own (every option)."""
    argv = list(argv)
    if argv and (names_config(argv) or not any(a in HELP for a in argv)):
        return False
    print(overview(command))
    sys.stdout.flush()
    return True
