"""K-fold cross-validation of one experiment, tracked in MLflow (nnU-Net's recipe).

    python -m medlit.cv CONFIG --num_folds K [--folds 0,2] [--cv_checkpoint last|best]
        [--postprocessing_metric dice|jaccard|lesion_dice] [--key=value ...]

One MLflow parent run holds the config, the fold assignment (``folds.csv``) and the
summary; each fold is a child run (tags ``fold=k``, ``medlit.cv.role=fold``) trained by
an ordinary ``medlit.fit`` with the fold's split, and tested on the fixed test split as
every fit is. Each fold's model then predicts the cases it did not train on (its
validation fold) in an out-of-fold child run (``medlit.cv.role=oof``): with its final
checkpoint by default, as nnU-Net does (choosing the best-on-validation one would bias
the estimate), ``--cv_checkpoint best`` for that one. The parent's ``cv_per_case.csv``
has every non-test case exactly once, with its fold, and ``cv_summary.csv`` the mean ±
sd of each metric across folds and across cases (classification: the pooled out-of-fold
scores too). The test split is never used to choose anything.

Segmentation: each out-of-fold case's raw regions are kept beside its run, and the
postprocessing is chosen on them (:mod:`medlit.postprocessing`: nnU-Net's largest
components, medlit's minimum component volume; a step is kept only if the mean Dice,
or ``--postprocessing_metric jaccard`` or ``lesion_dice`` (BraTS 2023's lesion-wise
Dice), improves and no region gets worse), recorded on
the parent (``postprocessing.json`` and ``.csv``). ``medlit.evaluate CONFIG --cv_run
PARENT --split test`` then scores the folds' ensemble on the test split, postprocessed
as chosen, and ``medlit.predict CONFIG --cv_run PARENT ...`` predicts with it.

Killed at any point, the same command continues: finished folds are not trained again,
an unfinished one resumes from its ``last.ckpt`` (each fold keeps it, for the final
checkpoint). Overrides pass through to every fold (``--trainer.devices=2
--trainer.strategy=ddp`` trains each fold on two devices). LUNA16's folds are its official
subsets (those of ``split.train`` and ``split.val`` present); ``--num_folds`` does not
re-split them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from medlit.cvruns import FOLD, KEY, ROLE, checkpoint_folder, fold_checkpoint
from medlit.errors import ConfigError, exit_process, run_main
from medlit.overview import maybe_overview
from medlit.postprocessing import choose, load_cases
from medlit.tuning.worker import die_with_parent

log = logging.getLogger("medlit.cv")

# Settings that say where and how fast a fold trains, not what it learns: changing them
# between a killed command and its rerun still continues the same cross-validation.
RUNTIME_KEYS = (
    "devices",
    "num_nodes",
    "strategy",
    "accelerator",
    "enable_progress_bar",
    "enable_model_summary",
)


@dataclass(frozen=True)
class Fold:
    index: int
    overrides: list[str]
    train: list[str]
    val: list[str]


@dataclass(frozen=True)
class Plan:
    folds: list[Fold]
    test: list[str]

    def table(self) -> pd.DataFrame:
        """``folds.csv``: each case with the fold that validates it (``test``: held out)."""
        rows = [(c, str(f.index)) for f in self.folds for c in f.val]
        rows += [(c, "test") for c in self.test]
        return pd.DataFrame(rows, columns=["case_id", "fold"])


def cv_key(config: dict[str, Any], n_folds: int) -> str:
    """What identifies one cross-validation: the resolved config (less the runtime
    settings, the logger's run and the resume arguments) and the number of folds."""
    config = json.loads(json.dumps(config, default=str))
    trainer = config.get("trainer") or {}
    for k in RUNTIME_KEYS:
        trainer.pop(k, None)
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        for k in ("run_id", "run_name"):
            (logger.get("init_args") or {}).pop(k, None)
    for k in ("ckpt_path", "keep_last_checkpoint", "config"):
        config.pop(k, None)
    text = json.dumps({"config": config, "folds": n_folds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(args: list[str], num_folds: int | None) -> Plan:
    """The folds of the experiment ``args``, each with the cases it trains and validates
    on, found by splitting as each fold's own run will (nothing is trained or cached).
    The folds' validation cases partition the non-test cases, and the test cases are
    the same in every fold; anything else is refused."""
    from medlit.cli import build

    datamodule = build(args, track=False).datamodule
    overrides = datamodule.cv_folds(num_folds)
    folds, tests = [], []
    for index, extra in enumerate(overrides):
        dm = build([*args, *extra], track=False).datamodule
        dm.index()
        ids = dm.split_ids
        folds.append(Fold(index, extra, list(ids["train"]), list(ids["val"])))
        tests.append(sorted(ids["test"]))
    if any(t != tests[0] for t in tests):
        raise ConfigError("the folds' test cases differ: cross-validation needs one test split")
    seen: dict[str, int] = {}
    for f in folds:
        if not f.val or not f.train:
            raise ConfigError(
                f"fold {f.index} has no {'validation' if not f.val else 'training'} case"
            )
        for c in f.val:
            if c in seen:
                raise ConfigError(f"case {c} validates in folds {seen[c]} and {f.index}")
            seen[c] = f.index
    pool = {c for f in folds for c in (*f.train, *f.val)}
    if missing := sorted(pool - set(seen)):
        raise ConfigError(f"{len(missing)} cases are in no validation fold: {missing[:5]}")
    return Plan(folds, tests[0])


class CrossValidation:
    """The parent run and its fold and out-of-fold child runs, found again by the
    experiment's ``cv_key`` so that the same command continues where it stopped."""

    def __init__(self, args: list[str], plan: Plan, checkpoint: str, metric: str = "dice") -> None:
        from medlit.tuning.worker import Tracking, resolve, tracking_of

        self.args, self.plan, self.checkpoint, self.metric = args, plan, checkpoint, metric
        self.config, self.config_yaml = resolve(args)
        self.segmentation = _is_segmentation(self.config)
        uri, self.experiment = tracking_of(self.config)
        self.tracking = Tracking(uri, self.experiment)
        self.client = self.tracking.client
        self.key = cv_key(self.config, len(plan.folds))
        self.name = Path(args[0]).stem if args and not args[0].startswith("-") else "cv"
        self.parent = self._parent()

    # ---------------------------------------------------------------- runs

    def _runs(self, **tags: str) -> list[mlflow.entities.Run]:
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in {KEY: self.key, **tags}.items())
        return (
            self.tracking.call(
                "search runs",
                self.client.search_runs,
                [self.tracking.experiment_id],
                where,
                order_by=["attributes.start_time DESC"],
            )
            or []
        )

    def _parent(self) -> str:
        found = self._runs(**{ROLE: "parent"})
        if found:
            run_id = found[0].info.run_id
            log.info("continuing cross-validation %s (parent run %s)", self.key, run_id)
            self.tracking.call("reopen parent", self.client.update_run, run_id, "RUNNING")
            return run_id
        run_id = self.tracking.create_run(
            f"{self.name}-cv{len(self.plan.folds)}",
            {ROLE: "parent", KEY: self.key, "medlit.cv.num_folds": str(len(self.plan.folds))},
        )
        if run_id is None:
            raise ConfigError(f"MLflow at {self.tracking.uri} did not create the parent run")
        params = {
            "cv.num_folds": len(self.plan.folds),
            "cv.checkpoint": self.checkpoint,
            "cv.command": " ".join(self.args),
            "cv.test_cases": len(self.plan.test),
        }
        for k, v in params.items():
            self.tracking.call(f"param {k}", self.client.log_param, run_id, k, str(v)[:6000])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(self.config_yaml)
            self.plan.table().to_csv(Path(tmp) / "folds.csv", index=False)
            for name in ("config.yaml", "folds.csv"):
                self.tracking.call(name, self.client.log_artifact, run_id, str(Path(tmp) / name))
        return run_id

    def child(self, role: str, fold: int) -> mlflow.entities.Run | None:
        found = self._runs(**{ROLE: role, FOLD: str(fold)})
        return found[0] if found else None

    def _new_child(self, role: str, fold: int) -> str:
        run_id = self.tracking.create_run(
            f"{self.name}-fold{fold}" + ("-oof" if role == "oof" else ""),
            {
                "mlflow.parentRunId": self.parent,
                ROLE: role,
                FOLD: str(fold),
                KEY: self.key,
            },
        )
        if run_id is None:
            raise ConfigError(f"MLflow at {self.tracking.uri} did not create fold {fold}'s run")
        return run_id

    def _abandon(self, run: mlflow.entities.Run, why: str) -> None:
        """A child run that cannot be continued: left KILLED, out of the search (a new
        run of its fold starts clean, without the partial metrics)."""
        run_id = run.info.run_id
        log.info("run %s (%s): %s; a new run takes its place", run_id, run.info.run_name, why)
        self.tracking.call("tag", self.client.set_tag, run_id, ROLE, "abandoned")
        self.tracking.call("end run", self.client.set_terminated, run_id, "KILLED")

    def _checkpoints(self, run: mlflow.entities.Run) -> Path:
        return checkpoint_folder(self.tracking.uri, self.config, run)

    # ---------------------------------------------------------------- steps

    def train(self, fold: Fold) -> mlflow.entities.Run:
        """Fold ``fold`` trained (and tested) by ``medlit.fit`` into its child run: not at
        all when that run has finished, from its ``last.ckpt`` when it did not."""
        run = self.child("fold", fold.index)
        label = f"fold {fold.index} of {len(self.plan.folds)}"
        resume: list[str] = []
        if run is not None and run.info.status == "FINISHED":
            log.info("%s: finished before (run %s), not trained again", label, run.info.run_id)
            return run
        if run is not None and (last := self._checkpoints(run) / "last.ckpt").is_file():
            log.info("%s: continuing run %s from %s", label, run.info.run_id, last)
            resume = [f"--ckpt_path={last}"]
        elif run is not None:  # stopped before its first epoch ended: start it again
            self._abandon(run, "stopped before its first checkpoint")
            run = None
        run_id = run.info.run_id if run is not None else self._new_child("fold", fold.index)
        log.info(
            "%s: training on %d cases, validating on %d (run %s)",
            label,
            len(fold.train),
            len(fold.val),
            run_id,
        )
        self._medlit(
            "medlit.fit",
            *fold.overrides,
            f"--trainer.logger.init_args.run_id={run_id}",
            "--keep_last_checkpoint=true",  # the final checkpoint predicts out of fold
            *resume,
        )
        return self.client.get_run(run_id)

    def predict_out_of_fold(self, fold: Fold, trained: mlflow.entities.Run) -> pd.DataFrame:
        """The fold's validation cases scored by its model (final or best checkpoint) in
        the fold's out-of-fold run, once; its per-case table with a ``fold`` column."""
        run = self.child("oof", fold.index)
        if run is not None and run.info.status != "FINISHED":
            self._abandon(run, "stopped before its evaluation ended")
            run = None
        if run is not None and self.segmentation and not self.regions(run.info.run_id).is_dir():
            # (its folder removed, or an earlier medlit's run): the postprocessing needs them
            self._abandon(run, "kept no out-of-fold regions")
            run = None
        table = self._table(run) if run is not None else None
        if run is not None and table is None:  # (an earlier medlit's classifier run)
            self._abandon(run, "logged no out-of-fold table")
            run = None
        if run is None:
            ckpt = fold_checkpoint(
                self._checkpoints(trained), self.checkpoint, fold.index, trained.info.run_id
            )
            run_id = self._new_child("oof", fold.index)
            self.tracking.call(
                "tag", self.client.set_tag, run_id, "medlit.cv.checkpoint", str(ckpt)
            )
            from medlit.evaluate import main as evaluate

            # Segmentation: each case's raw regions are kept beside the run, for the
            # postprocessing to be chosen on.
            regions = [f"--save_regions={self.regions(run_id)}"] if self.segmentation else []
            # In this process: an evaluation holds no state worth isolating, and a
            # process start (torch, Lightning, MLflow imports) costs more than a small
            # fold's evaluation.
            evaluate(
                [
                    *self.args,
                    *fold.overrides,
                    f"--ckpt_path={ckpt}",
                    "--split=val",
                    "--postprocessing=none",
                    *regions,
                    f"--trainer.logger.init_args.run_id={run_id}",
                ]
            )
            run = self.client.get_run(run_id)
            table = self._table(run)
            if table is None:
                raise ConfigError(f"out-of-fold run {run_id} logged no per-case table")
        table.insert(0, "fold", fold.index)
        return table

    def _table(self, run: mlflow.entities.Run) -> pd.DataFrame | None:
        """The out-of-fold run's per-case (segmentation, detection) or per-image
        (classification) validation table."""
        for name in ("val_per_case.csv", "val_predictions.csv"):
            with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Exception):
                path = mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id,
                    artifact_path=name,
                    dst_path=tmp,
                    tracking_uri=self.tracking.uri,
                )
                table = pd.read_csv(path).rename(columns={"image": "case_id"})
                return table.drop(columns=[c for c in ("epoch",) if c in table])
        return None

    def regions(self, run_id: str) -> Path:
        """Where the out-of-fold run ``run_id`` keeps its cases' raw regions."""
        run = self.client.get_run(run_id)
        return checkpoint_folder(self.tracking.uri, self.config, run).parent / "oof_regions"

    def choose_postprocessing(self, done: list[Fold]) -> pd.DataFrame | None:
        """The postprocessing the out-of-fold segmentations of ``done`` support
        (:func:`medlit.postprocessing.choose`), recorded on the parent run:
        ``postprocessing.json`` (what ``medlit.predict``/``evaluate --cv_run`` apply),
        ``postprocessing.csv`` (every step tried, the metric per region before and
        after), the tag ``medlit.cv.postprocessing`` and the metrics
        ``cv/postprocessed/<metric>_<region>``."""
        if not self.segmentation or not done:
            return None
        folders = [self.regions(self.child("oof", f.index).info.run_id) for f in done]
        if missing := [f.index for f, d in zip(done, folders, strict=True) if not d.is_dir()]:
            log.warning("folds %s kept no out-of-fold regions: no postprocessing chosen", missing)
            return None
        cases, names = load_cases(folders)
        chosen, table = choose(cases, names, self.metric)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "postprocessing.json").write_text(chosen.to_json())
            table.to_csv(Path(tmp) / "postprocessing.csv", index=False)
            for name in ("postprocessing.json", "postprocessing.csv"):
                self.tracking.call(
                    name, self.client.log_artifact, self.parent, str(Path(tmp) / name)
                )
        self.tracking.call(
            "tag", self.client.set_tag, self.parent, "medlit.cv.postprocessing", chosen.describe()
        )
        for k, name in enumerate(names):
            for when, values in (
                ("raw", table.attrs["start"]),
                ("postprocessed", table.attrs["end"]),
            ):
                self.tracking.call(
                    "metric",
                    self.client.log_metric,
                    self.parent,
                    f"cv/{when}/{self.metric}_{name}",
                    float(values[k]),
                )
        table.attrs["chosen"] = chosen
        return table

    def _medlit(self, command: str, *extra: str) -> None:
        """``python -m <command>`` on the experiment with ``extra``; SIGKILL reaches it
        when this process dies, a signal to this process is passed on."""
        cmd = [sys.executable, "-m", command, *self.args, *extra]
        proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)  # noqa: PLW1509
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            code = proc.wait()
        if code:
            self.tracking.call("parent", self.client.set_terminated, self.parent, "KILLED")
            print(
                f"medlit.cv: {command} of a fold stopped (exit status {code}); run the same "
                "command to continue the cross-validation",
                file=sys.stderr,
            )
            raise SystemExit(code)

    def summarise(
        self, done: list[Fold], tables: list[pd.DataFrame], metrics: list[dict[str, float]]
    ) -> pd.DataFrame:
        """``cv_per_case.csv`` and ``cv_summary.csv`` on the parent run, and its ``cv/``
        metrics: each metric's mean and sd across folds and across cases."""
        per_case = pd.concat(tables, ignore_index=True)
        expected = {c for f in done for c in f.val}
        ids = per_case["case_id"].astype(str)
        if ids.duplicated().any() or set(ids) != expected:
            raise ConfigError(
                "the out-of-fold tables do not hold each validation case once "
                f"({len(ids)} rows, {ids.nunique()} cases, {len(expected)} expected)"
            )
        rows = []
        folds = pd.DataFrame(metrics)
        for name in folds.columns:
            rows.append(_row(name, "folds", folds[name]))
        numeric = [
            c
            for c in per_case.columns
            if c != "fold" and np.issubdtype(per_case[c].dtype, np.number)
        ]
        for name in numeric:
            rows.append(_row(name, "cases", per_case[name]))
        rows += _pooled(per_case)
        summary = pd.DataFrame(rows, columns=["metric", "across", "mean", "sd", "n"])
        with tempfile.TemporaryDirectory() as tmp:
            per_case.to_csv(Path(tmp) / "cv_per_case.csv", index=False)
            summary.to_csv(Path(tmp) / "cv_summary.csv", index=False)
            for name in ("cv_per_case.csv", "cv_summary.csv"):
                self.tracking.call(
                    name, self.client.log_artifact, self.parent, str(Path(tmp) / name)
                )
        for r in summary.itertuples():
            if np.isfinite(r.mean):
                stem = f"cv/{r.metric}" if r.across != "cases" else f"cv/cases/{r.metric}"
                self.tracking.call(
                    "metric", self.client.log_metric, self.parent, f"{stem}_mean", r.mean
                )
                if np.isfinite(r.sd):
                    self.tracking.call(
                        "metric", self.client.log_metric, self.parent, f"{stem}_sd", r.sd
                    )
        return summary

    def finish(self, done: list[int]) -> None:
        complete = sorted(done) == list(range(len(self.plan.folds)))
        self.tracking.call(
            "tag",
            self.client.set_tag,
            self.parent,
            "medlit.cv.folds_done",
            ",".join(map(str, sorted(done))),
        )
        status = "FINISHED" if complete else "KILLED"
        self.tracking.call("end parent", self.client.set_terminated, self.parent, status)


def _row(name: str, across: str, values: pd.Series) -> tuple[str, str, float, float, int]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return name, across, float(v.mean()) if len(v) else float("nan"), sd, len(v)


def _pooled(per_case: pd.DataFrame) -> list[tuple[str, str, float, float, int]]:
    """Classification: the challenge's scores of all out-of-fold predictions together."""
    probs = [c for c in per_case.columns if c.startswith("p_")]
    if not probs or "truth" not in per_case:
        return []
    import torch

    from medlit.metrics.classification import balanced_accuracy, per_class_auc

    p = torch.tensor(per_case[probs].to_numpy(np.float64))
    index = {c.removeprefix("p_"): i for i, c in enumerate(probs)}
    t = torch.tensor([index[str(n)] for n in per_case["truth"]])
    n = len(per_case)
    rows = [("balanced_accuracy", "pooled", float(balanced_accuracy(p, t)), float("nan"), n)]
    aucs = [a for a in per_class_auc(p, t) if not np.isnan(a)]
    if aucs:
        rows.append(("auc_macro", "pooled", float(np.mean(aucs)), float("nan"), n))
    return rows


def _is_segmentation(config: dict[str, Any]) -> bool:
    """Whether the experiment's task segments (its out-of-fold regions can be kept)."""
    import importlib

    from medlit.tasks.segmentation import SegmentationTask

    path = str((config.get("model") or {}).get("class_path", ""))
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, SegmentationTask)


def render_postprocessing(table: pd.DataFrame, metric: str) -> str:
    """Each step tried, the mean metric before and after, and whether it was kept."""
    lines = ["", f"Postprocessing, chosen on the out-of-fold cases ({metric})", "-" * 60]
    for r in table.itertuples():
        where = f"{r.step} {r.region}" + (f" {r.setting}" if r.setting else "")
        before = getattr(r, f"{metric}_mean_before")
        after = getattr(r, f"{metric}_mean_after")
        lines.append(f"{where:<44} {before:.4f} -> {after:.4f}  {'kept' if r.kept else 'not kept'}")
    lines.append(f"chosen: {table.attrs['chosen'].describe()}")
    return "\n".join(lines)


def render(summary: pd.DataFrame) -> str:
    """The summary's metrics (the per-case volumes and component counts stay in the
    CSV): mean ± sd across the folds' runs, across the cases, pooled."""
    shown = summary[~summary["metric"].str.startswith(("volume_ml_", "components_"))]
    lines = ["", "Cross-validation (out of fold; test: each fold's run)", "-" * 60]
    width = max((len(m) for m in shown["metric"]), default=6)
    for r in shown.itertuples():
        sd = f" ± {r.sd:.4f}" if np.isfinite(r.sd) else ""
        lines.append(f"{r.metric:<{width}}  {r.across:<6} {r.mean:10.4f}{sd}  (n={r.n})")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medlit.cv", add_help=False)
    p.add_argument("--num_folds", "--num-folds", type=int, default=None)
    p.add_argument("--folds", type=str, default=None, help="the folds to run, e.g. 0,2")
    p.add_argument("--cv_checkpoint", "--cv-checkpoint", choices=("last", "best"), default="last")
    p.add_argument(
        "--postprocessing_metric",
        "--postprocessing-metric",
        choices=("dice", "jaccard", "lesion_dice"),
        default="dice",
    )
    return p


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.cv", args):
        return None
    ours, rest = parser().parse_known_args(args)
    if ours.num_folds is not None and ours.num_folds < 2:
        raise ConfigError(f"--num_folds must be 2 or more, got {ours.num_folds}")
    folds = plan(rest, ours.num_folds)
    k = len(folds.folds)
    try:
        selected = sorted({int(f) for f in ours.folds.split(",")}) if ours.folds else list(range(k))
    except ValueError:
        raise ConfigError(f"--folds {ours.folds}: give fold numbers, e.g. --folds 0,2") from None
    if bad := [f for f in selected if not 0 <= f < k]:
        raise ConfigError(f"--folds {ours.folds}: {bad} outside 0..{k - 1}")
    cv = CrossValidation(rest, folds, ours.cv_checkpoint, ours.postprocessing_metric)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trained = {f.index: cv.train(f) for f in folds.folds if f.index in selected}
    scored = {
        f.index: cv.predict_out_of_fold(f, trained[f.index])
        for f in folds.folds
        if f.index in selected
    }
    # every fold predicted out of fold so far, by this command or an earlier one (--folds)
    done = [
        f for f in folds.folds if (r := cv.child("oof", f.index)) and r.info.status == "FINISHED"
    ]
    tables, metrics = [], []
    for f in done:
        oof, fit = cv.child("oof", f.index), cv.child("fold", f.index)
        tables.append(scored[f.index] if f.index in scored else cv.predict_out_of_fold(f, fit))
        metrics.append(
            {
                **{k: v for k, v in oof.data.metrics.items() if k.startswith("val/")},
                **{k: v for k, v in fit.data.metrics.items() if k.startswith("test/")},
            }
        )
    summary = cv.summarise(done, tables, metrics)
    chosen = cv.choose_postprocessing(done)
    cv.finish([f.index for f in done])
    print(render(summary))
    if chosen is not None:
        print(render_postprocessing(chosen, ours.postprocessing_metric))
    print(
        f"MLflow parent run {cv.parent} (experiment '{cv.experiment}'): cv_per_case.csv, "
        "cv_summary.csv, folds.csv, config.yaml"
        + (", postprocessing.json/.csv" if chosen is not None else "")
        + ("" if len(done) == k else f"; {k - len(done)} folds still to run")
    )
    return summary


if __name__ == "__main__":
    exit_process(run_main(main))
