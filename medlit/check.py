"""Check an experiment's dataset and config, and list every problem at once.

    python -m medlit.check CONFIG [--section.key=value ...] [--deep]

The config is parsed and its classes are built exactly as ``medlit.fit`` builds them, so
an unknown key, a wrong type, an unknown model or encoder name (with the nearest known
names) or an output folder that cannot be written fails here as it would there. Then
every case of the configured dataset goes through the checks a run applies when it
caches the case; instead of stopping at the first broken case, each problem is one line:

    ERROR   <case>: <file>: <what was found, and what was expected>
    WARNING <case>: <file>: ...

Exit status: 0 when there is no error (warnings do not fail), 1 when the dataset has
errors, 2 when the config or the dataset root itself is unusable. ``--deep`` also
re-verifies every cached case against its source files (content hash, every array, the
metadata); an entry that differs is removed, so the next run rebuilds it.
"""

from __future__ import annotations

import logging
import sys
import time

from medlit.cli import build
from medlit.datamodules.base import BaseDataModule
from medlit.errors import ConfigError, Report, exit_process, run_main
from medlit.overview import maybe_overview

log = logging.getLogger("medlit")


def check(argv: list[str]) -> Report:
    """Run every check of the config ``argv`` (as ``medlit.fit`` takes it); print and return
    the report."""
    deep = "--deep" in argv
    args = [a for a in argv if a != "--deep"]
    # Nothing is tracked: the run's logger is not built (no store is created).
    datamodule = build(args, track=False).datamodule
    if not isinstance(datamodule, BaseDataModule):
        raise ConfigError(f"{type(datamodule).__name__} is not a medlit data module: no checks")
    report = Report(strict=False)
    start = time.perf_counter()
    n = datamodule.check(report, deep=deep)
    seconds = time.perf_counter() - start
    for problem in report.problems:
        print(problem)
    errors, warnings = len(report.errors), len(report.warnings)
    print(
        f"medlit check: {type(datamodule).__name__} at {datamodule.root}: {n} cases checked"
        f"{' (deep: cache verified)' if deep else ''} in {seconds:.1f} s: {errors} "
        f"error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.check", args):  # --help without a config
        return 0
    result: list[Report] = []
    status = run_main(lambda: result.append(check(args)))
    if status:
        return status
    return 1 if result[0].errors else 0


if __name__ == "__main__":
    exit_process(main())
