"""The messages medlit's commands silence, each one named, with why.

No blanket filter: each entry matches one message by its opening words, so that any other
warning of the same library still reaches the user. :func:`install` is called by every
command-line entry point (:func:`medlit.errors.run_main`), never on import, so a program
that uses medlit as a library keeps its own warning settings.
"""

from __future__ import annotations

import logging
import warnings

# Python warnings: (regular expression matching the message's start, why it is silenced).
WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own call of a torch API that torch deprecated (twice per run: fit and "
        "test); nothing the user can change, and gone when Lightning updates the call",
    ),
    (
        r"predict returned None if it was on purpose",
        "medlit's predict_step writes each prediction to its file and returns None on "
        "purpose (nothing is collected in memory)",
    ),
)

# Log records: (logger name, the message's opening words, why it is silenced).
RECORDS: tuple[tuple[str, str, str], ...] = (
    (
        "pytorch_lightning.utilities.rank_zero",
        "💡 Tip: For seamless cloud logging",
        "Lightning's advertisement for its hosted logger, on every run that does not use it",
    ),
    (
        "pytorch_lightning.utilities.rank_zero",
        "TPU available:",
        "medlit does not run on TPUs; the GPU line before it says what is used",
    ),
    (
        "pytorch_lightning.utilities.rank_zero",
        "Loaded model weights from the checkpoint at",
        "said right after 'Restoring states from the checkpoint path at' the same file, when "
        "testing or predicting (a resumed fit still says 'Restored all states')",
    ),
    (
        "mlflow.store.db.utils",
        "Creating initial MLflow database tables",
        "MLflow creating a new local store: nothing the user needs to know or do",
    ),
    (
        "mlflow.store.db.utils",
        "Updating database tables",
        "the second line of the same store creation (also said on every new store)",
    ),
)


class _Drop(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def install() -> None:
    """Silence exactly the messages listed in :data:`WARNINGS` and :data:`RECORDS`."""
    for pattern, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _why in RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(tuple(prefixes)))
