"""Checkpoints loaded into a task for ``medlit.predict`` and ``medlit.evaluate``: one, or
an ensemble of several (``--ckpt_path A --ckpt_path B``, or ``--cv_run RUN_ID``: every
fold of a ``medlit.cv`` cross-validation), and the postprocessing applied to what it
predicts (``--postprocessing``).

An ensemble averages its members' probabilities, as nnU-Net ensembles its folds: each
member predicts a case whole (its own sliding window and mirroring, when the task has
them), then the probabilities are averaged and the task thresholds, scores and writes
the mean as it would one model's output. Segmentation (2D, 2.5D, 3D) and classification
ensemble; the other tasks refuse more than one checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from medlit.checkpoints import load_checkpoint
from medlit.datamodules.base import BaseDataModule
from medlit.errors import ConfigError
from medlit.tasks.base import BaseTask

log = logging.getLogger("medlit")


def checkpoint_paths(
    ckpt_paths: list[str] | None, cv_run: str | None, args: list[str]
) -> list[Path]:
    """The checkpoints that ``--ckpt_path`` (given once or more) or ``--cv_run`` name;
    exactly one of the two must be given. Each is checked as safe to load, by name."""
    if bool(ckpt_paths) == bool(cv_run):
        raise ConfigError("give --ckpt_path (once, or once per ensemble member) or --cv_run RUN_ID")
    if cv_run:
        from medlit.cvruns import fold_checkpoints

        paths = fold_checkpoints(args, cv_run)
    else:
        paths = [Path(p).expanduser() for p in ckpt_paths or []]
    for p in paths:
        load_checkpoint(p)  # refused here, naming the file, if it is not safe to load
    return paths


def _plain(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def load_weights(model: BaseTask, state: dict[str, Any], ckpt: Path, config: str) -> None:
    """A checkpoint's weights into ``model`` (its loss buffers left out, as when
    resuming), or a clear error when they belong to another architecture."""
    try:
        model.on_load_checkpoint(state)
        model.load_state_dict(state.get("state_dict", {}))
    except RuntimeError as e:  # size mismatch / missing keys: another architecture
        detail = " ".join(str(e).split())[:600]
        raise ConfigError(
            f"--ckpt_path {ckpt} does not fit the model of {config} ({detail})"
        ) from None


def load_members(
    model: BaseTask, datamodule: BaseDataModule, paths: list[Path], config: str
) -> list[dict[str, Any]]:
    """Load ``paths`` into ``model``: the first's weights into it, each further one into
    a copy of it, which it then averages (:meth:`~medlit.tasks.base.BaseTask.set_ensemble`).
    What the data module kept in the checkpoints (VolumeDataModule: the training data's
    fingerprint, which preprocesses new cases as training did) goes into ``datamodule``;
    members that were trained on differently preprocessed data, or whose outputs mean
    different things (classes, regions), are refused, naming the checkpoints. Returns the
    checkpoints' contents."""
    states = [load_checkpoint(p) for p in paths]
    members = [model, *(copy.deepcopy(model) for _ in paths[1:])]
    if len(members) > 1:
        model.set_ensemble(members)  # refused here for a task that does not ensemble
        first = states[0].get("hyper_parameters") or {}
        for p, s in zip(paths[1:], states[1:], strict=True):
            hp = s.get("hyper_parameters") or {}
            for key in type(model).output_hparams:
                if _plain(hp.get(key)) != _plain(first.get(key)):
                    raise ConfigError(
                        f"--ckpt_path {p}: its {key} is {hp.get(key)!r}, that of {paths[0]} is "
                        f"{first.get(key)!r}; an ensemble's members must predict the same outputs"
                    )
    for m, p, s in zip(members, paths, states, strict=True):
        load_weights(m, s, p, config)
    key = type(datamodule).__qualname__
    data = [s.get(key) for s in states]
    for p, d in zip(paths[1:], data[1:], strict=True):
        if _plain(d) != _plain(data[0]):
            raise ConfigError(
                f"--ckpt_path {p} was trained on data preprocessed otherwise than {paths[0]} "
                f"(the {key} state the checkpoints keep differs); an ensemble's members must "
                "see the same input"
            )
    if data[0] is not None:
        datamodule.load_state_dict(data[0])
    if len(members) > 1:
        log.info("an ensemble of %d checkpoints: %s", len(paths), ", ".join(map(str, paths)))
    return states


def set_postprocessing(model: BaseTask, choice: str, cv_run: str | None, args: list[str]) -> str:
    """``--postprocessing``: ``auto`` applies what ``--cv_run``'s cross-validation chose
    on its out-of-fold cases (nothing without ``--cv_run``, or when it chose none),
    ``none`` nothing, a path that file's steps (a ``postprocessing.json``). Returns what
    is applied, in words."""
    from medlit.postprocessing import Postprocessing
    from medlit.tasks.segmentation import SegmentationTask

    if choice == "none":
        return "none"
    if choice == "auto":
        if not cv_run:
            return "none"
        from medlit.cvruns import chosen_postprocessing

        chosen = chosen_postprocessing(args, cv_run)
        if chosen is None:
            return "none"
    else:
        chosen = Postprocessing.read(Path(choice).expanduser())
    if not isinstance(model, SegmentationTask):
        raise ConfigError(f"--postprocessing {choice}: postprocessing is for segmentation tasks")
    if list(chosen.regions) != list(model.region_names):
        raise ConfigError(
            f"--postprocessing {choice}: chosen for the regions {list(chosen.regions)}, the "
            f"model's are {model.region_names}"
        )
    model.postprocessing = chosen
    return chosen.describe()
