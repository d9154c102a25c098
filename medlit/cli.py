"""MedlitCLI: the one LightningCLI subclass behind ``medlit.fit`` (and later sweep/predict).

The YAML config *is* the constructors' signatures (``class_path``/``init_args``), so
``--help``, ``--print_config``, and parse-time errors naming the bad key come from
jsonargparse for free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from medlit.callbacks import FiniteLossGuard, LastCheckpoint, ResumeState, Speedups
from medlit.completion import PrintCompletion
from medlit.curves import LearningCurves
from medlit.datamodules.base import BaseDataModule
from medlit.errors import ConfigError, MedlitError, Unburied
from medlit.progress import EpochLine, interactive, progress_bar
from medlit.tasks.base import BaseTask
from medlit.tracking import DEFAULT_TRACKING_URI, MLflowTracker, flatten, log_run_metadata
from medlit.tuning.trial import TrialReporter
from medlit.tuning.trial import context as sweep_trial
from medlit.usage import UsageError, command, explain


class TrackConfig(SaveConfigCallback):
    """Log the resolved config (YAML artifact + flattened params), git commit, package
    versions and data provenance (``data=synthetic|real``) to the run at setup."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        tags = {
            "task": type(pl_module).__name__,
            "datamodule": type(dm).__name__ if dm is not None else "none",
            "data": "synthetic" if isinstance(dm, BaseDataModule) and dm.is_synthetic else "real",
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
    # what is kept on disk once the run has finished, not what is trained
    "keep_last_checkpoint",
)


# Constructor arguments added since c9de9f4, the last version whose config hash covered
# every resolved key ("ClassName.argument"): the hash a run started by that version was
# tagged with is recomputed without them (and with the old names of renamed arguments,
# ``renamed_arguments``), so that ``--ckpt_path=last`` still finds it. Add an argument
# here when you add one to a task or data module (tests/test_resume.py pins the hashes).
LEGACY_ADDED: frozenset[str] = frozenset(
    {
        "BraTSDataModule.elastic",  # the 3D path
        "BraTSDataModule.target_spacing",
        "DetectionTask.grad_clip_norm",  # Ultralytics' gradient clipping
        "VolumeDataModule.fingerprint_from",  # cross-validation's shared fingerprint
        "SegmentationTask.explain",  # Seg-Grad-CAM overlays
        "Segmentation3DTask.explain",
        "BraTSDataModule.dicom",  # DICOM input rules and DICOM SEG codes
        "VolumeDataModule.dicom",
        "LUNA16DataModule.dicom",
    }
)


def _digest(flat: dict[str, Any]) -> str:
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _classes(flat: dict[str, Any]) -> dict[str, type]:
    """``prefix`` -> class of every ``<prefix>class_path`` of a flattened config."""
    out = {}
    for key, value in flat.items():
        if not key.endswith("class_path") or not isinstance(value, str) or "." not in value:
            continue
        module, _, name = value.rpartition(".")
        try:
            out[key.removesuffix("class_path")] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return out


def signature_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """The default of every constructor argument of a flattened config: the trainer's, and
    each ``class_path``'s (model, data, logger, ...) under its ``init_args``."""
    out = {
        f"trainer.{name}": p.default
        for name, p in inspect.signature(Trainer.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for prefix, cls in _classes(flat).items():
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            continue
        for arg, p in params.items():
            if dataclasses.is_dataclass(p.default):  # a settings group: each field
                for name, value in dataclasses.asdict(p.default).items():
                    out[f"{prefix}init_args.{arg}.{name}"] = value
            elif p.default is not inspect.Parameter.empty:
                out[f"{prefix}init_args.{arg}"] = p.default
    return out


def config_hashes(config: dict[str, Any]) -> list[str]:
    """The identities of an experiment's config for ``--ckpt_path=last``, current first.

    The current one covers what defines the experiment: the resolved config without the
    :data:`RESUME_FREE` keys, with renamed arguments under their new names, and without
    every argument left at its default, so that an argument added to a constructor later
    (at its default) leaves the hash unchanged. The second is the hash that runs were
    tagged with up to c9de9f4 (every resolved key, defaults too), computed on this config
    as that version would have resolved it."""
    flat = {k: v for k, v in flatten(config).items() if k not in RESUME_FREE}
    classes = _classes(flat)
    renames = {  # old key -> new key
        f"{prefix}init_args.{old}": f"{prefix}init_args.{new}"
        for prefix, cls in classes.items()
        if isinstance(cls, type) and issubclass(cls, (BaseTask, BaseDataModule))
        for new, old in cls.renamed_arguments.items()
    }
    for old, new in renames.items():
        if (value := flat.pop(old, None)) is not None:
            flat[new] = value
    # A setting that moved into a group (loader.batch_size) is hashed under its old flat
    # key (batch_size), so that both hashes are the ones the flat config had.
    grouped = {
        f"{prefix}init_args.{new}": f"{prefix}init_args.{old}"
        for prefix, cls in classes.items()
        if isinstance(cls, type) and issubclass(cls, BaseDataModule)
        for old, new in cls.moved_arguments.items()
    }
    flat = {grouped.get(k, k): v for k, v in flat.items()}
    defaults = {grouped.get(k, k): v for k, v in signature_defaults(flat).items()}
    current = {k: v for k, v in flat.items() if not (k in defaults and _same(v, defaults[k]))}
    back = {new: old for old, new in renames.items()}
    added = {
        f"{prefix}init_args.{arg}"
        for prefix, cls in classes.items()
        for arg in (a.split(".", 1)[1] for a in LEGACY_ADDED if a.split(".")[0] == cls.__name__)
    }
    # An added settings group (data.dicom) is left out with each of its fields.
    legacy = {
        back.get(k, k): v
        for k, v in flat.items()
        if k not in added and k.rpartition(".")[0] not in added
    }
    return [_digest(current), _digest(legacy)]


def config_hash(config: dict[str, Any]) -> str:
    """The current identity of an experiment's config (the run's ``medlit.config_hash``
    tag); see :func:`config_hashes`."""
    return config_hashes(config)[0]


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
            save_config_callback=kwargs.pop("save_config_callback", TrackConfig),
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

    def init_parser(self, **kwargs: Any) -> Any:
        kwargs.setdefault("prog", command())  # argparse would say fit.py
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """As LightningCLI's, less its warning about ``args`` given beside ``sys.argv``
        (medlit's entry points pass their own normalised argv on purpose), and with a
        config that does not parse said in a few lines (:mod:`medlit.usage`) instead of
        the usage text and jsonargparse's union-subtype listing."""
        from jsonargparse import ArgumentError

        parser.exit_on_error = False
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as e:
            options = list(getattr(parser, "_option_string_actions", {}))
            raise UsageError(explain(str(e), list(args or []), options)) from None
        finally:
            parser.exit_on_error = True

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--print_completion", action=PrintCompletion)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="continue a run: 'last' (the latest unfinished run of this config in its "
            "MLflow experiment) or a checkpoint file (its run is continued)",
        )
        parser.add_argument(
            "--keep_last_checkpoint",
            type=bool,
            default=False,
            help="keep last.ckpt (the full training state, about 3x the best checkpoint) "
            "once the run has finished; by default it is removed then, as only resuming an "
            "unfinished run reads it",
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
                    monitor=self.model.monitor if isinstance(self.model, BaseTask) else None,
                    mode=self.model.mode if isinstance(self.model, BaseTask) else "min",
                    save_top_k=1,
                    filename="best-{epoch:03d}",
                    auto_insert_metric_name=False,
                    # Weights only: a third of the size, and all that testing the best needs.
                    save_weights_only=True,
                )
            )
        if not any(isinstance(c, LastCheckpoint) for c in user):
            extra.append(LastCheckpoint())
        if not any(isinstance(c, LearningCurves) for c in user):
            extra.append(LearningCurves())
        if not any(isinstance(c, EpochLine) for c in user):
            extra.append(EpochLine())
        if trainer_cfg.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in user
        ):
            if trainer_cfg.get("enable_progress_bar") is None and not interactive():
                # A log file (a SLURM job, > run.log): the bar's frames, not epoch lines.
                kwargs["enable_progress_bar"] = False
            else:
                extra.append(progress_bar())
        if trainer_cfg.get("logger") not in (None, False) and not any(
            isinstance(c, LearningRateMonitor) for c in user
        ):
            extra.append(LearningRateMonitor(logging_interval="epoch"))
        if (
            trainer_cfg.get("strategy") == "ddp"
            and isinstance(self.model, BaseTask)
            and self.model.ddp_find_unused_parameters
        ):
            # A task whose steps leave some parameters without gradients (a GAN's
            # discriminator step never reaches the generator) needs DDP to look for them.
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        return super().instantiate_trainer(callbacks=[*user, *extra], **kwargs)


def normalise_args(argv: Sequence[str]) -> list[str]:
    """``CONFIG [overrides]`` -> ``--config CONFIG [overrides]`` (LightningCLI's spelling),
    with keys that moved into a settings group upgraded (:func:`upgrade_keys`)."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    return upgrade_keys(argv)


def _data_class(args: Sequence[str], configs: list[dict]) -> type | None:
    """The data module class an experiment names, on the command line or in its configs
    (the last one wins, as when parsing)."""
    path = None
    for config in configs:
        data = config.get("data")
        if isinstance(data, dict) and isinstance(data.get("class_path"), str):
            path = data["class_path"]
    for i, arg in enumerate(args):
        for key in ("--data", "--data.class_path"):
            if arg == key and i + 1 < len(args):
                path = args[i + 1]
            elif arg.startswith(f"{key}="):
                path = arg.split("=", 1)[1]
    if not path or path.lstrip().startswith(("{", "[")):
        return None
    if "." not in path:  # a bare class name, as LightningCLI accepts it
        path = f"medlit.datamodules.{path}"
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse names the bad class path


def _moved_warning(cls: type, old: str, new: str) -> None:
    import logging
    import warnings

    message = (
        f"{cls.__name__}: data key `{old}` moved into the `{new.split('.')[0]}` group and "
        f"will be removed; use `data.{new}` (the same value)"
    )
    warnings.warn(message, FutureWarning, stacklevel=4)
    logging.getLogger("medlit").warning(message)


def upgrade_keys(args: list[str]) -> list[str]:
    """Configs and overrides that still use a data-module argument that moved into a
    settings group (``batch_size`` -> ``loader.batch_size``, the class's
    ``moved_arguments``) rewritten to the new key, each with a deprecation warning, so
    that they parse as before. A config file that needs it is passed on as the rewritten
    YAML text (jsonargparse's ``--config`` takes a path or the YAML itself)."""
    import yaml

    from medlit import yamlsafe

    configs: list[tuple[int, dict]] = []  # (index in args, the file's content)
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path and Path(path).is_file():
            try:
                text = Path(path).read_text()
            except OSError:
                continue  # jsonargparse reports it, naming the file
            content = yamlsafe.load(text, path)
            if isinstance(content, dict):
                configs.append((i, content))
        elif path:  # the YAML itself (jsonargparse takes that too)
            yamlsafe.check(path, "--config")
    cls = _data_class(args, [c for _, c in configs])
    moves = cls.moved_arguments if isinstance(cls, type) and issubclass(cls, BaseDataModule) else {}
    if not moves:
        return args
    out = list(args)
    for i, content in configs:
        data = content.get("data")
        if not isinstance(data, dict):
            continue
        init = data.get("init_args") if isinstance(data.get("init_args"), dict) else data
        old_keys = [k for k in list(init) if k in moves]
        for old in old_keys:
            group, field = moves[old].split(".")
            value = init.pop(old)
            if not isinstance(init.get(group), dict):
                init[group] = {}
            init[group][field] = value
            _moved_warning(cls, old, moves[old])
        if old_keys:
            text = yaml.safe_dump(content, sort_keys=False)
            if out[i] == "--config":
                out[i + 1] = text
            else:
                out[i] = f"--config={text}"
    for i, arg in enumerate(out):
        for prefix in ("--data.init_args.", "--data."):
            if not arg.startswith(prefix):
                continue
            key, eq, value = arg[len(prefix) :].partition("=")
            if key in moves:
                out[i] = f"--data.{moves[key]}{eq}{value}"
                _moved_warning(cls, key, moves[key])
            break
    return out


def check_compatible(model: LightningModule, datamodule: LightningDataModule) -> None:
    """The task takes as many input channels as the data module yields and predicts the
    target its labels need (``segmentation_target``), or a ``ConfigError`` that says
    which value to set."""
    if not isinstance(datamodule, BaseDataModule):
        return
    channels = datamodule.num_channels
    expected = model.hparams.get("in_channels")
    if channels is not None and expected is not None and channels != expected:
        raise ConfigError(
            f"model.in_channels={expected} but the data module yields {channels} channels "
            f"({type(datamodule).__name__}.num_channels); set "
            f"--model.in_channels={channels}"
        )
    wanted = datamodule.segmentation_target()
    if wanted is None or "num_classes" not in model.hparams:
        return
    target, num_classes, names = wanted
    h = model.hparams
    if h.get("target") in ("regions", "labels") and (h["target"], h["num_classes"]) != (
        target,
        num_classes,
    ):
        raise ConfigError(
            f"model.target={h['target']} with num_classes={h['num_classes']}, but the "
            f"labels of {type(datamodule).__name__} ({', '.join(names)}) need "
            f"--model.target={target} --model.num_classes={num_classes}"
            + (" (background included)" if target == "labels" else " (one per region)")
        )
    given = list(h.get("region_names") or [])
    if given and given != names:
        raise ConfigError(
            f"model.region_names={given} but {type(datamodule).__name__}'s labels are "
            f"{names} (in their order): set --model.region_names=[{', '.join(names)}]"
        )


def check_schedule(model: LightningModule, trainer: Trainer) -> None:
    """The task's learning-rate schedule has a length: medlit's warm-up + cosine runs per
    epoch over ``trainer.max_epochs``, and Lightning's ``max_epochs: -1`` ("until
    max_steps or forever") would give it none (the rate then flips between the peak and
    the floor every epoch). Refused with the fix, before a run is opened."""
    if not isinstance(model, BaseTask) or model.hparams.get("scheduler", "cosine") == "none":
        return
    if trainer.max_epochs is None or trainer.max_epochs < 0:  # 0: no training, fine
        steps = f" (max_steps={trainer.max_steps})" if trainer.max_steps > 0 else ""
        raise ConfigError(
            f"trainer.max_epochs={trainer.max_epochs}{steps} leaves the cosine learning-rate "
            "schedule without a length: set trainer.max_epochs to the epochs to train, or "
            "model.scheduler=none for a constant rate"
        )


@dataclass
class Experiment:
    """One experiment, parsed and built: the checked task, data module and trainer."""

    cli: MedlitCLI
    model: LightningModule
    datamodule: LightningDataModule
    trainer: Trainer

    @property
    def config(self) -> Any:
        """The resolved config (jsonargparse namespace)."""
        return self.cli.config

    @property
    def fingerprints(self) -> list[str]:
        """:func:`config_hashes` of the resolved config."""
        return config_hashes(self.config.as_dict())


def build(argv: Sequence[str], *, defaults: Sequence[str] = (), track: bool = True) -> Experiment:
    """The builder every entry point uses: ``CONFIG [--key=value ...]`` parsed and built
    exactly as ``medlit.fit`` builds it, and the task checked against the data module.

    Args:
        argv: the config file first (or ``--config FILE``), then overrides.
        defaults: overrides of the entry point's own (``medlit.predict --device`` as
            trainer settings), applied after the config file and before the user's
            overrides, so that the user's win.
        track: False: no logger is built, so nothing is tracked and no store is made.
    """
    args = normalise_args(argv)
    head, rest = (args[:2], args[2:]) if args[:1] == ["--config"] else ([], args)
    # Last, so that no config's logger settings bring a logger back.
    tail = [] if track else ["--trainer.logger=false"]
    # Untracked (predict, check): no config/versions files either; they would otherwise
    # land in the working folder (the log folder of a trainer without a logger).
    try:
        cli = MedlitCLI(
            args=[*head, *defaults, *rest, *tail],
            **({} if track else {"save_config_callback": None}),
        )
    except Unburied as e:  # a damaged tracking store, say: its own one-line error
        raise e.error from None
    check_compatible(cli.model, cli.datamodule)
    name = run_name(argv)
    for tracker in cli.trainer.loggers if track else []:
        # Lightning's logger leaves the name to MLflow, which draws it from the generator
        # seed_everything has just seeded: every run of every experiment had one name.
        if isinstance(tracker, MLflowTracker) and tracker._run_name is None:
            tracker._run_name = name
    return Experiment(cli, cli.model, cli.datamodule, cli.trainer)


# Overrides that say where a run logs or resumes, not what it trains: not in its name.
UNNAMED = ("--ckpt_path", "--config", "--trainer.logger", "--print_config", "--keep_last")


def run_name(argv: Sequence[str], when: float | None = None) -> str:
    """A run's default MLflow name: what it is, so that runs can be told apart in the
    UI's table and chart legends: the config file's name, the overrides given on the
    command line (the last part of each key: ``lr=3e-4``) and the start time, e.g.
    ``brats_unet lr=3e-4 max_epochs=20 12-01 18:13:05``."""
    import time

    args = list(argv)
    stem = "run"
    if args and not args[0].startswith("-"):
        stem, args = Path(args[0]).stem, args[1:]
    parts: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        i += 1
        if key == "--config":  # the first config names the experiment; later ones add to it
            if stem == "run" and "\n" not in value:
                stem = Path(value).stem
            continue
        if not key.startswith("--") or key.startswith(UNNAMED):
            continue
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    overrides = " ".join(parts)
    if len(overrides) > 60:
        overrides = overrides[:59] + "…"
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(when))
    return " ".join(p for p in (stem, overrides, stamp) if p)


def prepare(datamodule: LightningDataModule) -> None:
    """Check and cache every case before anything runs. Under torchrun/SLURM every rank
    runs the entry point: only each node's first process prepares (as Lightning does);
    the others wait for it at Lightning's own ``prepare_data`` barrier."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        datamodule.prepare_data()
