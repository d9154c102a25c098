"""What a run records about itself: the resolved config, git commit, package versions."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning import Trainer

from medlit.artifacts import log_file
from medlit.tracking.logger import MLflowTracker

TRACKED_PACKAGES = (
    "medlit",
    "torch",
    "torchvision",
    "pytorch-lightning",
    "timm",
    "segmentation-models-pytorch",
    "albumentations",
    "mlflow",
    "optuna",
    "SimpleITK",
    "nibabel",
    "torchmetrics",
    "numpy",
    "ultralytics",
)


def git_commit() -> str:
    """Commit of the medlit checkout (``+dirty`` when it has uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"model.init_args.lr": 3e-4, ...}`` for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, list) and v and not isinstance(v[0], int | float | str | bool):
            out[key] = [str(x) for x in v]  # e.g. the config file paths
        else:
            out[key] = v
    return out


def log_run_metadata(
    trainer: Trainer, config: dict[str, Any], config_yaml: str, tags: dict[str, str]
) -> None:
    """Resolved config (YAML artifact + flattened params), git commit, versions, tags."""
    for tracker in (lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)):
        params = {
            k: v
            for k, v in flatten(config).items()
            if not k.startswith("trainer.logger") and k != "ckpt_path"
        }
        changed: dict[str, str] = {}
        if tracker.reopened and (run := tracker.run(tracker.run_id)) is not None:
            # MLflow keeps a param's first value: a resumed run that trains longer
            # (trainer.max_epochs) records what changed as tags, and logs only new params.
            before = run.data.params
            changed = {
                f"medlit.resumed.{k}": f"{before[k]} -> {str(v)[:250]}"
                for k, v in params.items()
                if k in before and before[k] != str(v)[:250]
            }
            params = {k: v for k, v in params.items() if k not in before}
        if params:
            tracker.log_hyperparams(params)
        tracker.set_tags(
            {
                "git_commit": git_commit(),
                **tags,
                **changed,
                **{f"version.{k}": v for k, v in package_versions().items()},
            }
        )
        tracker.beat(force=True)
    log_file(trainer, "config.yaml", lambda p: p.write_text(config_yaml))
    log_file(
        trainer,
        "versions.yaml",
        lambda p: p.write_text(yaml.safe_dump(package_versions(), sort_keys=True)),
    )
