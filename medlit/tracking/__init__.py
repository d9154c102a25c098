"""MLflow tracking that never kills training.

- :mod:`~medlit.tracking.logger`: :class:`MLflowTracker`, the Lightning logger;
- :mod:`~medlit.tracking.retry`: retries and which failures are final;
- :mod:`~medlit.tracking.store`: the default store, SQLite store creation;
- :mod:`~medlit.tracking.spool`: calls kept after an outage, and ``sync``
  (``python -m medlit.tracking sync``);
- :mod:`~medlit.tracking.metadata`: config, git commit and versions of a run;
- :mod:`~medlit.tracking.resume`: finding and reopening the run a checkpoint continues.

The default store is ``sqlite:///mlruns/mlflow.db`` (MLflow 3 refuses the plain file
store); artifacts go next to it under ``mlruns/``. Open the UI with::

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

The names below stay importable from ``medlit.tracking`` (configs name
``medlit.tracking.MLflowTracker`` as their logger's class path).
"""

import importlib
from typing import Any

# Imported when first used (PEP 562): `python -m medlit.tracking runs` only reads the
# store, and importing the logger brings in Lightning and torch (about 20 s on 2 cores).
_HOMES = {
    "DEFAULT_TRACKING_URI": "medlit.tracking.store",
    "MLflowTracker": "medlit.tracking.logger",
    "fail_fast_over_http": "medlit.tracking.retry",
    "flatten": "medlit.tracking.metadata",
    "git_commit": "medlit.tracking.metadata",
    "init_store": "medlit.tracking.store",
    "log_file": "medlit.artifacts",
    "log_folder": "medlit.artifacts",
    "log_run_metadata": "medlit.tracking.metadata",
    "package_versions": "medlit.tracking.metadata",
    "rejected": "medlit.tracking.retry",
    "retrying": "medlit.tracking.retry",
    "sync_spool": "medlit.tracking.spool",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'medlit.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLflowTracker",
    "fail_fast_over_http",
    "flatten",
    "git_commit",
    "init_store",
    "log_file",
    "log_folder",
    "log_run_metadata",
    "package_versions",
    "rejected",
    "retrying",
    "sync_spool",
]
