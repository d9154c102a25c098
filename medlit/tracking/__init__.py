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

from medlit.artifacts import log_file, log_folder
from medlit.tracking.logger import MLflowTracker
from medlit.tracking.metadata import flatten, git_commit, log_run_metadata, package_versions
from medlit.tracking.retry import fail_fast_over_http, rejected, retrying
from medlit.tracking.spool import sync_spool
from medlit.tracking.store import DEFAULT_TRACKING_URI, init_store

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
