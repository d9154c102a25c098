"""medlit's own error types: each one names the file, the value found and what was expected."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

log = logging.getLogger(__name__)


class MedlitError(Exception):
    """Base class of every error medlit raises on purpose (bad data, bad config, bad run)."""


class ConfigError(MedlitError):
    """The experiment configuration is inconsistent (e.g. channels of data and model differ)."""


class DatasetNotFoundError(MedlitError):
    """The configured dataset root holds no dataset in any layout medlit can read."""


class InvalidCaseError(MedlitError):
    """One case (subject) of a dataset is broken; raised before any training starts.

    Args:
        case: the case identifier, e.g. ``BraTS2021_00012``.
        path: the offending file (or the case folder when a file is missing).
        problem: what is wrong, with the value found and the value expected.
    """

    def __init__(self, case: str, path: str | Path, problem: str) -> None:
        self.case = case
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"case {case}: {self.path}: {problem}")


class NonFiniteLossError(MedlitError):
    """The training loss became NaN or infinite; the run is stopped instead of training on."""


class CacheWriteError(MedlitError):
    """The preprocessing cache could not be written (disk full, read-only); nothing
    half-written is left behind."""


class Unburied(BaseException):
    """Carries a :class:`MedlitError` out of a constructor that jsonargparse calls while it
    builds the config (the logger): jsonargparse catches every ``Exception`` a Union
    subtype's constructor raises and reports only "Does not validate against any of the
    Union subtypes", with the cause buried in its text. ``medlit.cli.build`` raises the
    error it carries."""

    def __init__(self, error: MedlitError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset: an error stops training, a warning does not."""

    severity: Literal["error", "warning"]
    case: str
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.severity.upper():<7} {self.case}: {self.path}: {self.problem}"


class Report:
    """What the data checks found.

    The checks call ``error``/``warning`` for each problem and go on. A strict report
    (the default, used while a run checks and caches its data) raises the first error as
    ``InvalidCaseError`` at once and logs warnings; ``medlit.check`` collects every
    problem instead and lists them all.
    """

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.problems: list[Problem] = []

    def error(self, case: str, path: str | Path, problem: str) -> None:
        if self.strict:
            raise InvalidCaseError(case, path, problem)
        self.problems.append(Problem("error", str(case), Path(path), problem))

    def refuse(self, error: MedlitError, case: str, path: str | Path) -> None:
        """A problem of the whole dataset or config rather than of one file (no labelled
        case, a target the release lacks): a strict report raises ``error`` itself, of its
        own type (``DatasetNotFoundError``, ``ConfigError``); a collecting one lists it as
        an error of ``case`` at ``path``."""
        if self.strict:
            raise error
        self.problems.append(Problem("error", str(case), Path(path), str(error)))

    def warning(self, case: str, path: str | Path, problem: str) -> None:
        if self.strict:
            log.warning("case %s: %s: %s", case, path, problem)
        self.problems.append(Problem("warning", str(case), Path(path), problem))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def count(self) -> int:
        """Problems recorded so far (to tell whether a check added one)."""
        return len(self.problems)


def run_main(main: Callable[[], object]) -> int:
    """Exit status of an entry point: 0, or 2 with ``medlit: error: ...`` on stderr for
    medlit's own errors (bad data, bad config), which need no traceback. The messages
    that tell a user nothing are silenced first (:mod:`medlit.quiet`)."""
    from medlit import quiet

    quiet.install()
    try:
        main()
    except MedlitError as e:
        print(f"medlit: error: {e}", file=sys.stderr)
        return 2
    return 0


def exit_process(status: int) -> NoReturn:
    """End a command's process with ``status``, doing what a normal exit does first (the
    threading module's exit hooks, then wait for non-daemon threads; run the ``atexit``
    handlers: logging, multiprocessing's workers, MLflow, coverage; flush stdout and
    stderr) but without the interpreter's finalisation, which frees every module's
    objects one by one: 1.6-2.6 s after a run with torch, Lightning and MLflow imported,
    paid by every command and every sweep trial. medlit writes its files through ``with`` blocks and atomic renames, so no
    buffered file is left for finalisation to flush. Used only where a command has
    returned; an exception or a signal leaves the normal way."""
    # The interpreter's own first step of an exit (CPython calls it from Py_Finalize):
    # the threading atexit hooks, which tell ThreadPoolExecutor workers (MLflow's artifact
    # uploads) to stop, then the join of every non-daemon thread. Joining the threads
    # without those hooks waited for an idle executor worker for ever.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe
            stream.flush()
    os._exit(status)
