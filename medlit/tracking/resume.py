"""Resuming a run: the checkpoint ``--ckpt_path`` names (``last``: the latest unfinished
run of the same config) and the MLflow run the resumed training logs into."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medlit.checkpoints import load_checkpoint, run_id_of
from medlit.errors import ConfigError
from medlit.liveness import HEARTBEAT_GRACE, me, owner_alive
from medlit.tracking.logger import MLflowTracker

log = logging.getLogger("medlit")


def resume_from(asked: str, trainer: Any, fingerprints: list[str]) -> str:
    """The checkpoint to continue from; the run's tracker is pointed at the MLflow run it
    belongs to (the resumed run logs into the same run id).

    ``fingerprints``: the config hashes this config is known by, newest scheme first
    (:func:`medlit.cli.config_hashes`): a run started by an older medlit is found too."""
    tracker = next((lg for lg in trainer.loggers if isinstance(lg, MLflowTracker)), None)
    if asked == "last":
        if tracker is None:
            raise ConfigError("--ckpt_path=last finds runs through MLflow; give a file path")
        root = Path(tracker.save_dir or trainer.default_root_dir)
        try:
            path, run_id = last_unfinished(tracker, root, fingerprints)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the store does not answer
            newest = max(root.glob("*/*/checkpoints/last.ckpt"), key=_mtime, default=None)
            use = (
                f"the newest local last.ckpt is {newest} (run {newest.parents[1].name}): pass "
                f"--ckpt_path={newest} to continue from it"
                if newest is not None
                else f"there is no last.ckpt under {root}"
            )
            raise ConfigError(
                f"--ckpt_path=last: MLflow at {tracker.tracking_uri} cannot be reached to look "
                f"up the run ({type(e).__name__}: {str(e)[:160]}); {use}, or retry when the "
                "store answers"
            ) from None
    else:
        path = Path(asked)
        if tracker is not None and not path.exists():
            _refuse_removed_last(tracker, path)
        run_id = run_id_of(load_checkpoint(path))
        if tracker is not None and run_id:
            run_id = _continued_run(tracker, path, run_id, fingerprints)
    if tracker is not None and run_id:
        tracker.reopen(run_id)
        log.info("resuming MLflow run %s from %s", run_id, path)
    return str(path)


def _refuse_removed_last(tracker: MLflowTracker, path: Path) -> None:
    """A clear error for the ``last.ckpt`` of a finished run (``<store>/<experiment>/<run>/
    checkpoints/last.ckpt``), which ``medlit.fit`` removes at the run's end: "no such
    file" alone did not say why. Continuing from the best weights instead would not be
    the same training (no optimizer or scheduler state, and not the last epoch)."""
    if path.name != "last.ckpt" or path.parent.name != "checkpoints":
        return
    run_id = path.parents[1].name
    run = tracker.run(run_id)
    if run is None or run.info.status != "FINISHED":
        return
    best = sorted(path.parent.glob("best-*.ckpt"))
    weights = f"; its best weights ({best[-1]}) serve evaluate and predict" if best else ""
    raise ConfigError(
        f"--ckpt_path {path}: its run {run_id} has finished and its last.ckpt was removed at "
        f"the end (only an unfinished run is resumed from it){weights}. To train a run "
        "longer once it has finished, run it with --keep_last_checkpoint=true"
    )


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _owner(run: Any) -> dict | None:
    """The live process training ``run`` (RUNNING, its owner alive), or None."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    if tags.get("medlit.owner") == me():  # this process (an earlier fit in it): not another
        return None
    return owner_alive(tags.get("medlit.owner"), tags.get("medlit.heartbeat"), HEARTBEAT_GRACE)


def _who(owner: dict) -> str:
    if "age" in owner:
        return (
            f"process {owner.get('pid')} on {owner.get('host')} (its last heartbeat "
            f"{owner['age'] / 60:.0f} min ago; taken for gone after "
            f"{HEARTBEAT_GRACE / 60:.0f} min without one)"
        )
    return f"process {owner.get('pid')} on this host"


def _continued_run(
    tracker: MLflowTracker, path: Path, run_id: str, fingerprints: list[str]
) -> str | None:
    """The run a checkpoint's training continues in: its own when unfinished and of this
    config; else None, a new run (the old one is left as it is). A run still being
    trained by a live process is refused."""
    run = tracker.run(run_id)
    if run is None:
        reason = f"its run {run_id} is not in {tracker.tracking_uri}"
    elif run.info.status == "FINISHED":
        reason = f"its run {run_id} has finished"
    elif run.data.tags.get("medlit.config_hash") not in fingerprints:
        reason = f"its run {run_id} is of another config"
    elif owner := _owner(run):
        raise ConfigError(
            f"--ckpt_path {path}: its run {run_id} is still being trained by {_who(owner)}; "
            "two processes would write one run and one checkpoint folder. Stop it first"
        )
    else:
        return run_id
    log.warning("--ckpt_path %s: %s; training continues from it in a new run", path, reason)
    tracker.set_tags({"medlit.resumed_from": f"{path} (run {run_id})"})
    return None


def last_unfinished(
    tracker: MLflowTracker, root: Path, fingerprints: list[str]
) -> tuple[Path, str]:
    """``(last.ckpt, run id)`` of the newest run of this config that did not finish and
    left a ``last.ckpt`` under ``root/<experiment id>/<run id>/checkpoints``."""
    runs = sorted(
        {
            r.info.run_id: r for f in dict.fromkeys(fingerprints) for r in tracker.runs_of_config(f)
        }.values(),
        key=lambda r: r.info.start_time,
        reverse=True,
    )
    busy = []
    for run in runs:
        last = root / run.info.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
        if run.info.status == "FINISHED" or not last.is_file():
            continue
        if owner := _owner(run):  # another live process is training it: never join it
            log.warning(
                "run %s is still being trained by %s: skipped", run.info.run_id, _who(owner)
            )
            busy.append(run.info.run_id)
            continue
        return last, run.info.run_id
    alive = f"; {len(busy)} still being trained by live processes" if busy else ""
    finished = (
        "; a finished run is never continued by 'last', and keeps its last.ckpt only when "
        "run with --keep_last_checkpoint=true"
        if any(r.info.status == "FINISHED" for r in runs)
        else ""
    )
    raise ConfigError(
        f"--ckpt_path=last: experiment '{tracker.experiment_name}' at {tracker.tracking_uri} "
        f"has no unfinished run of this config with a last.ckpt ({len(runs)} runs of this "
        f"config, all finished or without one{alive}{finished}); give the checkpoint's path "
        "instead"
    )
