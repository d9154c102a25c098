"""medlit's own error types: each one names the file, the value found and what was expected."""

from __future__ import annotations

from pathlib import Path


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
