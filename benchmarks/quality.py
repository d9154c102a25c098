"""The README demos' quality, reproduced: ``python -m benchmarks --only quality``.

Each demo runs exactly as the README gives it (``python -m medlit.fit
experiments/demo/<name>.yaml``, or ``python -m medlit.sweep`` for the sweep), in its own
process, from an empty working folder: the demo data are written on first use, the cache
starts cold and the runs go to that folder's ``mlruns/``, so the wall time is what a new
user waits. The metrics are then read back from the MLflow store (the sweep's from its
Optuna journal) and checked against the targets below, which the README's numbers cite;
``docs/quality.md`` is the report.

The targets live here once. ``tests/test_demos.py`` checks the same ``Criterion`` objects
on shortened runs of the same configs (smaller phantoms, fewer steps), so the suite and
this benchmark cannot drift apart. Each criterion also names its trivial baseline (what an
untrained or collapsed model scores), from which a margin is derived: a shortened run used
as a test must clear ``threshold + 10 % of (threshold - baseline)`` for the worst of three
seeds, so that the test does not fail on an unlucky seed.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmarks.common import REPO, environment
from medlit.datasets.io.files import MARKER

EXPERIMENTS = REPO / "experiments"


@dataclass
class Outcome:
    """What a finished demo left: its final metrics and, per metric, every logged value in
    step order (validation curves)."""

    metrics: dict[str, float]
    history: dict[str, list[float]] = field(default_factory=dict)
    # The run's per-case tables (artifacts ``<stage>_per_case.csv``, by stem) and the
    # data root it trained on (its ``data.init_args.root``), for criteria on cases.
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    data_root: Path | None = None

    def curve(self, key: str) -> list[float]:
        if key not in self.history:
            raise KeyError(f"{key} was not logged (logged: {sorted(self.history)})")
        return self.history[key]


def mlflow_outcome(tracking_uri: str, experiment: str, workdir: Path | None = None) -> Outcome:
    """The latest run of ``experiment`` in the store: final metrics, every history, its
    per-case tables and data root (a relative root is taken from ``workdir``, the run's
    working folder; default the current one)."""
    import mlflow
    from mlflow.artifacts import download_artifacts

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no experiment {experiment!r} in {tracking_uri}")
    [run] = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)
    history = {
        key: [
            m.value
            for m in sorted(
                client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp)
            )
        ]
        for key in run.data.metrics
    }
    folder = Path(download_artifacts(run_id=run.info.run_id, tracking_uri=tracking_uri))
    tables = {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*_per_case.csv"))}
    root = run.data.params.get("data.init_args.root")
    data_root = (workdir or Path.cwd()) / root if root else None
    return Outcome(dict(run.data.metrics), history, tables, data_root)


@dataclass(frozen=True)
class Criterion:
    """One quality target: ``value(outcome)`` must reach ``threshold(outcome)`` (at or above
    when ``higher``, at or below otherwise; ``strict`` for a strict inequality). ``baseline``
    is what a trivial model scores on the same measure: the margin of a result is its
    distance past the threshold in units of (threshold - baseline)."""

    name: str
    value: Callable[[Outcome], float]
    threshold: Callable[[Outcome], float]
    baseline: Callable[[Outcome], float]
    target: str  # the target in words, for reports and assertion messages
    higher: bool = True
    strict: bool = False

    def check(self, outcome: Outcome) -> Check:
        value, threshold = self.value(outcome), self.threshold(outcome)
        baseline = self.baseline(outcome)
        past = value - threshold if self.higher else threshold - value
        met = past > 0 if self.strict else past >= 0
        span = abs(threshold - baseline)
        return Check(self, value, threshold, baseline, met, past / span if span else None)


@dataclass(frozen=True)
class Check:
    criterion: Criterion
    value: float
    threshold: float
    baseline: float
    met: bool
    margin: float | None  # (value past the threshold) / |threshold - baseline|; None if 0

    def __str__(self) -> str:
        margin = "" if self.margin is None else f", margin {self.margin:+.0%} of the span"
        return (
            f"{self.criterion.name} = {self.value:.4g} (target {self.criterion.target}: "
            f"{self.threshold:.4g}; trivial baseline {self.baseline:.4g}{margin})"
        )


def _metric(key: str) -> Callable[[Outcome], float]:
    return lambda o: o.metrics[key]


def _const(value: float) -> Callable[[Outcome], float]:
    return lambda o: value


def _fd_ratio(o: Outcome) -> float:
    """The Fréchet distance at the end (best of the last 3 validations) over the first."""
    fd = o.curve("val/fd_resnet18_random")
    return min(fd[-3:]) / fd[0]


def _lung_volume_error(o: Outcome) -> float:
    """The largest error (%) of a test scan's predicted lung volume against the phantom's
    exact one (its ellipsoid's 4/3 pi abc, which the demo data's marker records), over
    both lungs of every test scan."""
    marker = json.loads((o.data_root / MARKER).read_text())
    exact = marker["lung_volumes_ml"]
    table = o.tables["test_per_case"]
    errors = [
        abs(row[f"volume_ml_pred_{lung}"] / exact[row["case_id"]][k] - 1) * 100
        for _, row in table.iterrows()
        for k, lung in enumerate(("left_lung", "right_lung"))
    ]
    return max(errors)


def _diversity_ratio(o: Outcome) -> float:
    """The samples' diversity at the end (worst of the last 3 validations) over the real
    images' (a collapsed generator's is ~0)."""
    return min(o.curve("val/diversity")[-3:]) / o.curve("val/diversity_real")[-1]


@dataclass(frozen=True)
class Demo:
    """A README demo: its config, where its data go, how its outcome is read, its targets
    and what the README quotes for it."""

    name: str
    config: Path
    experiment: str  # the MLflow experiment the config logs to
    criteria: tuple[Criterion, ...]
    readme: str  # the README's words for the full demo
    command: str = "medlit.fit"


# The BraTS 2.5D demo's test mean Dice (WT, TC, ET) on the same split and seed, measured
# at the commit that added the 3D demo: the 3D demo is to reach it.
MEAN_DICE_3D = 0.789
DEMO_3D_WORDS = "~11 min; test mean Dice 0.785 with mirroring (the 2.5D demo: 0.789)"

DEMOS: tuple[Demo, ...] = (
    Demo(
        "BraTS U-Net",
        EXPERIMENTS / "demo/brats_unet.yaml",
        "brats-demo",
        (
            Criterion(
                "test WT Dice",
                _metric("test/dice_WT"),
                _const(0.80),
                _const(0.0),  # an empty prediction
                "≥ 0.80",
            ),
        ),
        "~13 min; WT Dice ≥ 0.80 on the held-out cases",
    ),
    Demo(
        "BraTS 3D U-Net",
        EXPERIMENTS / "demo/brats_unet3d.yaml",
        "brats-demo",
        (
            Criterion(
                "test mean Dice",
                _metric("test/dice_mean"),
                _const(MEAN_DICE_3D),
                _const(0.0),  # an empty prediction
                f"≥ {MEAN_DICE_3D} (the 2.5D demo's mean)",
            ),
        ),
        DEMO_3D_WORDS,
    ),
    Demo(
        "Volumes U-Net (nnU-Net raw)",
        EXPERIMENTS / "demo/volumes_unet.yaml",
        "volumes-demo",
        (
            Criterion(
                "test organ Dice",
                _metric("test/dice_organ"),
                _const(0.9),
                _const(0.0),  # an empty prediction
                "≥ 0.9",
            ),
            Criterion(
                "test lesion Dice",
                _metric("test/dice_lesion"),
                _const(0.6),
                _const(0.0),
                "≥ 0.6",
            ),
        ),
        "~5 min; test Dice organ 0.98, lesion 0.70-0.76",
    ),
    Demo(
        "LUNA16 lungs U-Net",
        EXPERIMENTS / "demo/luna16_lungs_unet.yaml",
        "luna16-lungs-demo",
        (
            Criterion(
                "test Dice, worse lung",
                lambda o: min(o.metrics["test/dice_left_lung"], o.metrics["test/dice_right_lung"]),
                _const(0.95),
                _const(0.0),  # an empty prediction
                "≥ 0.95",
            ),
            Criterion(
                "test lung volume vs the ellipsoid formula, worst (%)",
                _lung_volume_error,
                _const(2.0),
                _const(100.0),  # an empty prediction
                "≤ 2 %",
                higher=False,
            ),
        ),
        "~4 min; test Dice 0.99 per lung, volumes within 2 % of the exact ones",
    ),
    Demo(
        "ISIC classifier",
        EXPERIMENTS / "demo/isic_classifier.yaml",
        "isic-demo",
        (
            Criterion(
                "test balanced accuracy",
                _metric("test/balanced_accuracy"),
                _const(3 / 7),
                _const(1 / 7),  # chance over 7 classes
                "≥ 3/7 (3 × chance)",
            ),
        ),
        "~2.5 min",
    ),
    Demo(
        "ISIC U-Net",
        EXPERIMENTS / "demo/isic_unet.yaml",
        "isic-seg-demo",
        (
            Criterion(
                "test thresholded Jaccard",
                _metric("test/threshold_jaccard_lesion"),
                _const(0.75),
                _const(0.0),  # an empty mask (every image under the 0.65 threshold)
                "≥ 0.75",
            ),
        ),
        "~4 min",
    ),
    Demo(
        "LUNA16 YOLO",
        EXPERIMENTS / "demo/luna16_yolo.yaml",
        "luna16-demo",
        (
            Criterion(
                "test CPM",
                _metric("test/cpm"),
                _const(0.5),
                _const(0.0),  # no nodule found
                "≥ 0.5",
            ),
        ),
        "~5 min; test CPM 0.73",
    ),
    Demo(
        "BraTS pix2pix",
        EXPERIMENTS / "demo/brats_pix2pix.yaml",
        "brats-synthesis-demo",
        (
            Criterion(
                "test PSNR (dB)",
                _metric("test/psnr"),
                _metric("test/baseline_psnr"),
                _metric("test/baseline_psnr"),  # the normalised T2 as the FLAIR
                "> the T2-as-FLAIR baseline",
                strict=True,
            ),
            Criterion(
                "test SSIM",
                _metric("test/ssim"),
                _metric("test/baseline_ssim"),
                _metric("test/baseline_ssim"),
                "> the T2-as-FLAIR baseline",
                strict=True,
            ),
        ),
        "~4 min",
    ),
    Demo(
        "ISIC GAN",
        EXPERIMENTS / "demo/isic_gan.yaml",
        "isic-gan-demo",
        (
            Criterion(
                "Fréchet distance, end / start",
                _fd_ratio,
                _const(0.3),
                _const(1.0),  # a generator that does not learn
                "< 0.3",
                higher=False,
                strict=True,
            ),
            Criterion(
                "diversity, samples / real",
                _diversity_ratio,
                _const(0.7),
                _const(0.0),  # a collapsed generator
                "> 0.7",
                strict=True,
            ),
        ),
        "80 epochs, ~6 min",
    ),
)


def sweep_criteria() -> tuple[Criterion, ...]:
    return (
        Criterion(
            "trials finished (complete or pruned)",
            _metric("finished"),
            _const(6),
            _const(0),
            "all 6",
        ),
        Criterion(
            "best trial's val Dice",
            _metric("best"),
            _const(0.4),
            _const(0.0),
            "≥ 0.4",
        ),
        Criterion(
            "best - worst trial's val Dice (the search matters)",
            _metric("spread"),
            _const(0.2),
            _const(0.0),
            "≥ 0.2",
        ),
        Criterion(
            # A trial that peaks at its first validation (the warm-up epoch) and only
            # gets worse was not trained by the search, only started.
            "best trial's best epoch (0 = the first)",
            _metric("best_epoch"),
            _const(1),
            _const(0),
            "≥ 1 (past the first)",
        ),
    )


SWEEP = Demo(
    "BraTS sweep",
    EXPERIMENTS / "sweeps/demo/brats_unet.yaml",
    "brats-demo",
    sweep_criteria(),
    "6 trials in ~7.5 min; validation Dice 0.29 to 0.87 across trials",
    command="medlit.sweep",
)


def sweep_outcome(workdir: Path) -> Outcome:
    """The demo sweep's trials, from its Optuna journal (the README's default storage)."""
    import optuna

    from medlit.tuning.storage import make_storage

    storage = make_storage(str(workdir / "mlruns/optuna/brats-unet-demo.journal"))
    study = optuna.load_study(study_name="brats-unet-demo", storage=storage)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = [t for t in study.trials if t.state in states]
    values = [
        t.value if t.value is not None else max(t.intermediate_values.values(), default=0.0)
        for t in done
    ]
    best = done[values.index(max(values))] if done else None
    curve = best.intermediate_values if best is not None else {}
    return Outcome(
        {
            "finished": float(len(done)),
            "best": max(values, default=0.0),
            "spread": max(values, default=0.0) - min(values, default=0.0),
            # 0-based, as the trial reported it (its epoch number)
            "best_epoch": float(max(curve, key=curve.get)) if curve else 0.0,
        }
    )


@dataclass
class Result:
    demo: Demo
    checks: list[Check]
    seconds: float
    load: tuple[float, float]  # 1-min load average before and after
    error: str = ""


def run_demo(demo: Demo, workdir: Path, log: Callable[[str], None]) -> Result:
    """One README demo, as a user runs it, in ``workdir`` (shared by the demos, as the
    README's ``data/demo`` and ``mlruns`` are: the two ISIC and two LUNA16 demos share
    their data)."""
    env = {**os.environ, "MEDLIT_CACHE_DIR": str(workdir / "cache")}
    env.pop("OMP_NUM_THREADS", None)  # the demos run with torch's own thread count
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(workdir / f"{demo.config.stem}-{demo.command}.log", "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-m", demo.command, str(demo.config)],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - start
    after = os.getloadavg()[0]
    if proc.returncode != 0:
        tail = (workdir / f"{demo.config.stem}-{demo.command}.log").read_text()[-2000:]
        return Result(demo, [], seconds, (load, after), f"exit {proc.returncode}: {tail}")
    if demo.command == "medlit.sweep":
        outcome = sweep_outcome(workdir)
    else:
        outcome = mlflow_outcome(f"sqlite:///{workdir}/mlruns/mlflow.db", demo.experiment, workdir)
    checks = [c.check(outcome) for c in demo.criteria]
    for c in checks:
        log(f"  {demo.name}: {c} -> {'met' if c.met else 'MISSED'}")
    return Result(demo, checks, seconds, (load, after))


def render(results: list[Result], seconds: float, command: str) -> str:
    env = environment()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# medlit demo quality",
        "",
        f"Generated by `{command}` on {now} in {seconds / 60:.1f} min. Each README demo ran "
        "unchanged, as the README gives it, in its own process, from an empty folder (demo "
        "data written and cached on first use, so the wall time is a new user's). The "
        "targets are defined once in `benchmarks/quality.py`; `tests/test_demos.py` checks "
        "the same targets on shortened runs of the same configs.",
        "",
        "| | |",
        "| --- | --- |",
        f"| machine | {env['machine']} |",
        f"| CUDA | {env['CUDA']} |",
        f"| torch | {env['torch']} |",
        f"| medlit | {env['medlit']} |",
        "",
        "| demo | command | metric | value | target | trivial baseline | met | wall time "
        "| load avg (1 min) before → after | README |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        config = r.demo.config.relative_to(REPO)
        cmd = f"`python -m {r.demo.command} {config}`"
        wall = f"{r.seconds / 60:.1f} min"
        load = f"{r.load[0]:.1f} → {r.load[1]:.1f}"
        if r.error:
            lines.append(
                f"| {r.demo.name} | {cmd} | — | failed | — | — | **no** | {wall} | {load} "
                f"| {r.demo.readme} |"
            )
            continue
        for i, c in enumerate(r.checks):
            first = i == 0
            lines.append(
                f"| {r.demo.name if first else ''} | {cmd if first else ''} "
                f"| {c.criterion.name} | {c.value:.4g} | {c.criterion.target} "
                f"({c.threshold:.4g}) | {c.baseline:.4g} | {'yes' if c.met else '**no**'} "
                f"| {wall if first else ''} | {load if first else ''} "
                f"| {r.demo.readme if first else ''} |"
            )
    failed = [r for r in results if r.error]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            lines += [f"### {r.demo.name}", "", "```", r.error.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def run(workdir: Path, output: Path, log: Callable[[str], None], command: str) -> Path:
    """Every demo in turn, then the report at ``output``."""
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    for demo in (*DEMOS, SWEEP):
        log(f"quality: {demo.name} ({demo.config.relative_to(REPO)}) ...")
        results.append(run_demo(demo, workdir, log))
        log(f"quality: {demo.name} took {results[-1].seconds:.0f} s")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(results, time.perf_counter() - start, command))
    return output
