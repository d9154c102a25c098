"""Optuna sweep over a medlit experiment: one command, resumable, parallel.

    python -m medlit.sweep experiments/sweeps/demo_brats_unet.yaml [--n-trials 20]
        [--storage postgresql://user:pw@db/optuna] [--workers 2] [--timeout 3600]

The sweep file (every key can also be given as a flag, which wins over the file)::

    experiment: ../brats_unet.yaml          # the base experiment, relative to this file
    overrides: {trainer.max_epochs: 30}     # fixed for every trial
    objective: {metric: val/dice_mean, direction: maximize, mode: best}
    search_space:
      model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.encoder: {type: categorical, choices: [resnet18, resnet34]}
      data.loader.batch_size: {type: int, low: 8, high: 32, step: 8}
    n_trials: 20                            # for the whole study, all workers together
    timeout: null                           # seconds; this worker starts no trial after it
    sampler: {name: tpe, seed: 0}           # tpe | random | cmaes | grid
    pruner: {name: median, kwargs: {n_startup_trials: 3, n_warmup_steps: 2}}
    study_name: brats-unet                  # default: the sweep file's name
    storage: null                           # default: mlruns/optuna/<study_name>.journal

While a trial runs, the worker prints its values and log file, one line per validation
(``trial 3  epoch 2/3  ...  val/dice_mean 0.61  best 0.61 (epoch 2)``) and its result,
each line naming its trial. Running the command again resumes the study; running it in
several terminals (or on several hosts against PostgreSQL) adds workers. Each trial is
an MLflow child run of the study's parent run; the best trial's full config is written
to ``mlruns/sweeps/<study_name>/best_config.yaml``, which ``medlit.fit`` runs unchanged.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import Path_fr

from medlit import yamlsafe
from medlit.errors import ConfigError, exit_process, run_main
from medlit.overview import maybe_overview
from medlit.tuning import space as sp
from medlit.tuning.worker import SweepConfig, Worker

log = logging.getLogger("medlit.sweep")


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m medlit.sweep",
        description="Optuna sweep over a medlit experiment (see the module docstring).",
        default_env=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="the sweep file (YAML)")
    p.add_argument("--experiment", type=Path_fr, required=True, help="base experiment YAML")
    p.add_argument("--overrides", type=dict[str, Any], default={}, help="fixed config values")
    p.add_class_arguments(sp.Objective, "objective", help="the metric a trial is worth")
    p.add_argument("--search_space", type=dict[str, sp.Param], required=True)
    p.add_argument(
        "--n_trials", "--n-trials", type=int | None, default=None, help="trials in the whole study"
    )
    p.add_argument("--timeout", type=float | None, default=None, help="seconds for this worker")
    p.add_class_arguments(sp.SamplerConfig, "sampler")
    p.add_class_arguments(sp.PrunerConfig, "pruner")
    p.add_argument("--study_name", "--study-name", type=str | None, default=None)
    p.add_argument("--storage", type=str | None, default=None, help="journal file or DB URL")
    p.add_argument(
        "--output_dir",
        "--output-dir",
        type=str | None,
        default=None,
        help="trial logs, best config",
    )
    p.add_argument(
        "--max_retry", "--max-retry", type=int, default=2, help="retries of a dead worker's trial"
    )
    p.add_argument(
        "--test_trials", "--test-trials", type=bool, default=False, help="also test each trial"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes to start here")
    # Accepted from older commands; each trial's draw is now seeded by its trial number.
    p.add_argument("--worker_index", type=int, default=0, help="(no longer needed)")
    return p


def _normalise(argv: list[str]) -> list[str]:
    """``FILE --n-trials 4`` -> ``--config FILE --n_trials 4``."""
    out = []
    for i, a in enumerate(argv):
        if i == 0 and not a.startswith("-"):
            out += ["--config", a]
        elif a.startswith("--"):
            name, eq, value = a.partition("=")
            out.append(re.sub(r"(?<=\w)-(?=\w)", "_", name) + eq + value)
        else:
            out.append(a)
    return out


def load(argv: list[str]) -> tuple[SweepConfig, int]:
    args = _normalise(argv)
    for key, value in zip(args, args[1:], strict=False):
        if key == "--config" and Path(value).is_file():
            yamlsafe.check(Path(value).read_text(), value)  # before jsonargparse expands it
    ns = parser().parse_args(args)
    init = parser().instantiate(ns)
    source = str(Path(str(ns.config[0])).resolve()) if ns.get("config") else ""
    name = init.study_name or (Path(source).stem if source else "sweep")
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"study_name '{name}': use letters, digits, '.', '_' and '-' only")
    if init.n_trials is not None and init.n_trials < 1:
        raise ConfigError(f"n_trials must be at least 1, got {init.n_trials}")
    cfg = SweepConfig(
        experiment=Path(init.experiment.absolute).resolve(),
        objective=init.objective,
        search_space=dict(init.search_space),
        overrides=dict(init.overrides),
        n_trials=init.n_trials,
        timeout=init.timeout,
        sampler=init.sampler,
        pruner=init.pruner,
        study_name=name,
        storage=init.storage,
        output_dir=Path(init.output_dir) if init.output_dir else None,
        max_retry=init.max_retry,
        test_trials=init.test_trials,
        source=source,
    )
    return cfg, init.workers


def spawn_workers(argv: list[str], n: int) -> int:
    """``--workers N``: N worker processes of this same sweep on this host."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "medlit.sweep", *argv, "--workers=1"])
        for _ in range(n)
    ]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.sweep", argv):  # --help without a sweep file
        return 0
    cfg, workers = load(argv)
    if workers > 1:
        code = spawn_workers(argv, workers)
        if code:
            raise SystemExit(code)
        return 0
    try:
        Worker(cfg).run()
    except KeyboardInterrupt:
        print(
            "medlit: sweep interrupted; its running trial was failed and queued for a retry. "
            "Run the same command to resume.",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
