"""MedlitCLI: the one LightningCLI subclass behind ``medlit.fit`` (and later sweep/predict).

The YAML config *is* the constructors' signatures (``class_path``/``init_args``), so
``--help``, ``--print_config``, and parse-time errors naming the bad key come from
jsonargparse for free.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from medlit.callbacks import FiniteLossGuard, LastCheckpoint, ResumeState, Speedups
from medlit.errors import ConfigError, MedlitError
from medlit.tracking import DEFAULT_TRACKING_URI, log_run_metadata
from medlit.tuning.trial import TrialReporter
from medlit.tuning.trial import context as sweep_trial


def run_main(main: Callable[[], object]) -> int:
    """Exit status of an entry point: 0, or 2 with ``medlit: error: ...`` on stderr for
    medlit's own errors (bad data, bad config), which need no traceback."""
    try:
        main()
    except MedlitError as e:
        print(f"medlit: error: {e}", file=sys.stderr)
        return 2
    return 0


class TrackConfig(SaveConfigCallback):
    """Log the resolved config (YAML artifact + flattened params), git commit, package
    versions and data provenance (``data=synthetic|real``) to the run at setup."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        tags = {
            "task": type(pl_module).__name__,
            "datamodule": type(dm).__name__ if dm is not None else "none",
            "data": "synthetic" if getattr(dm, "is_synthetic", False) else "real",
        }
        config = self.config.as_dict()
        tags["medlit.config_hash"] = config_hash(config)
        config_yaml = self.parser.dump(self.config, skip_none=False)
        log_run_metadata(trainer, config, config_yaml, tags)


# Keys that may differ between a run and its resumption: where to resume from, the run to
# log into, a longer schedule, and the speed switches.
RESUME_FREE = (
    "ckpt_path",
    "config",
    "trainer.logger.init_args.run_id",
    "trainer.max_epochs",
    # how fast, not what: the resumed run may turn these on or off
    "channels_last",
    "compile",
    "compile_mode",
)


def config_hash(config: dict[str, Any]) -> str:
    """Identity of an experiment's config for ``--ckpt_path=last``: the resolved config
    without :data:`RESUME_FREE` keys."""
    import hashlib
    import json

    from medlit.tracking import flatten

    flat = {k: v for k, v in flatten(config).items() if k not in RESUME_FREE}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unwritable(path: Path) -> str | None:
    """Why files cannot be created under ``path`` (which need not exist yet), or None.

    Tried for real (a temporary file in the nearest existing folder): permission bits say
    nothing on a read-only mount, or to root. Nothing is left behind, no folder made."""
    import tempfile

    path = path.expanduser().absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing} is not a folder" if existing else "no existing parent folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror or e})"
    return None


def output_dirs(config: Any) -> dict[str, Path]:
    """The folders a run writes, by config key: checkpoints and logs, the tracking store,
    the preprocessing cache, and the data root when demo data will be written there."""
    import os

    def get(node: Any, *keys: str) -> Any:
        for k in keys:
            if node is None:
                return None
            node = node.get(k) if hasattr(node, "get") else getattr(node, k, None)
        return node

    out: dict[str, Path] = {}
    if root_dir := get(config, "trainer", "default_root_dir"):
        out["trainer.default_root_dir"] = Path(root_dir)
    loggers = get(config, "trainer", "logger")
    for i, lg in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        uri = get(lg, "init_args", "tracking_uri")
        if isinstance(uri, str) and uri.startswith("sqlite:///"):
            key = "trainer.logger.init_args.tracking_uri" + (f"[{i}]" if i else "")
            out[key] = Path(uri.removeprefix("sqlite:///")).parent
    data = get(config, "data", "init_args")
    if data is not None:
        if "cache_dir" in data:  # every medlit data module has one; None is the default
            cache = get(data, "cache_dir")
            key = "data.init_args.cache_dir" + ("" if cache else " (default)")
            out[key] = Path(cache or os.environ.get("MEDLIT_CACHE_DIR", "~/.cache/medlit"))
        root = get(data, "root")
        if get(data, "demo") and root and not (Path(root).exists() and any(Path(root).iterdir())):
            out["data.init_args.root (demo data are written there)"] = Path(root)
    return out


class MedlitCLI(LightningCLI):
    """LightningCLI with medlit's defaults: MLflow tracking, best-checkpoint selection on
    the task's own metric, a NaN/Inf loss guard, and a fixed default seed."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=TrackConfig,
            save_config_kwargs={"save_to_log_dir": False},
            trainer_defaults={
                "logger": {
                    "class_path": "medlit.tracking.MLflowTracker",
                    "init_args": {"tracking_uri": DEFAULT_TRACKING_URI},
                },
            },
            seed_everything_default=42,
            auto_configure_optimizers=False,
            args=args,
            run=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="continue a run: 'last' (the latest unfinished run of this config in its "
            "MLflow experiment) or a checkpoint file (its run is continued)",
        )
        parser.add_argument(
            "--channels_last",
            type=bool,
            default=False,
            help="networks and 4D training images in channels-last (NHWC) memory format",
        )
        parser.add_argument(
            "--compile",
            type=bool,
            default=False,
            help="torch.compile every network of the task (in place: checkpoints unchanged)",
        )
        parser.add_argument(
            "--compile_mode",
            type=str | None,
            default=None,
            help="torch.compile mode: default, reduce-overhead or max-autotune",
        )

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but medlit's own error from a constructor (an unknown model
        name, inconsistent arguments) surfaces as itself: jsonargparse wraps it in a
        ValueError about union subtypes that buries the message."""
        try:
            super().instantiate_classes()
        except Exception as e:
            cause: BaseException | None = e
            seen = set()
            while (
                cause is not None and not isinstance(cause, MedlitError) and id(cause) not in seen
            ):
                seen.add(id(cause))
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, MedlitError):
                raise cause from None
            raise

    def before_instantiate_classes(self) -> None:
        """Refuse, before anything is built, an output folder that cannot be written."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        for key, path in output_dirs(config).items():
            if problem := unwritable(path):
                raise ConfigError(f"{key}={path}: the run cannot write there: {problem}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        user = trainer_cfg.get("callbacks") or []
        extra: list = [FiniteLossGuard(), ResumeState()]
        top = self.config.get(self.subcommand) if self.subcommand else self.config
        if top.get("channels_last") or top.get("compile"):
            extra.append(Speedups(top["channels_last"], top["compile"], top.get("compile_mode")))
        if (trial := sweep_trial()) is not None:  # this run is one trial of a sweep
            extra.append(TrialReporter(trial))
        if not any(isinstance(c, ModelCheckpoint) for c in user):
            extra.append(
                ModelCheckpoint(
                    monitor=getattr(self.model, "monitor", None),
                    mode=getattr(self.model, "mode", "min"),
                    save_top_k=1,
                    filename="best-{epoch:03d}",
                    auto_insert_metric_name=False,
                    # Weights only: a third of the size, and all that testing the best needs.
                    save_weights_only=True,
                )
            )
        if not any(isinstance(c, LastCheckpoint) for c in user):
            extra.append(LastCheckpoint())
        if trainer_cfg.get("logger") not in (None, False) and not any(
            isinstance(c, LearningRateMonitor) for c in user
        ):
            extra.append(LearningRateMonitor(logging_interval="epoch"))
        if trainer_cfg.get("strategy") == "ddp" and getattr(
            self.model, "ddp_find_unused_parameters", False
        ):
            # A task whose steps leave some parameters without gradients (a GAN's
            # discriminator step never reaches the generator) needs DDP to look for them.
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        return super().instantiate_trainer(callbacks=[*user, *extra], **kwargs)
