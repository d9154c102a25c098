"""Search spaces over config keys, and the sampler and pruner a sweep file names."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from medlit.errors import ConfigError

Primitive = (bool, int, float, str, type(None))


@dataclass
class Param:
    """One searched config key.

    Args:
        type: ``float``, ``int`` or ``categorical``.
        low: lower bound (float/int).
        high: upper bound, inclusive (float/int).
        step: grid step (float/int); ``log`` and ``step`` exclude each other.
        log: sample on a log scale (float/int).
        choices: the values of a categorical; any YAML value (a list of decoder
            channels, a dict of kwargs) is allowed, not only Optuna's scalars.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None


@dataclass
class Objective:
    """What a trial is worth.

    Args:
        metric: a metric the task logs at validation, e.g. ``val/dice_mean``.
        direction: ``maximize`` or ``minimize``.
        mode: ``best`` is the best value over the trial's validations (the epoch whose
            checkpoint the run keeps); ``last`` the final validation's value.
    """

    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"
    mode: Literal["best", "last"] = "best"


@dataclass
class SamplerConfig:
    """Args:
    name: ``tpe`` (default), ``random``, ``cmaes`` or ``grid``.
    seed: seed of the sampler; trial ``k`` is drawn with ``seed + k``, so that a sweep
        is reproducible and parallel workers (started by ``--workers`` or by hand with
        the same command) never draw the same values.
    kwargs: further keyword arguments of the Optuna sampler, e.g.
        ``{n_startup_trials: 5}`` for TPE.
    """

    name: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    seed: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConfig:
    """Args:
    name: ``median`` (default), ``hyperband``, ``percentile``, ``threshold`` or
        ``none``.
    kwargs: keyword arguments of the Optuna pruner, e.g. ``{n_startup_trials: 3,
        n_warmup_steps: 2}`` for the median pruner (steps are epochs),
        ``{percentile: 25.0}``, or ``{lower: 0.2}`` for the threshold pruner (stop a trial
        whose metric falls below 0.2).
    """

    name: Literal["median", "hyperband", "percentile", "threshold", "none"] = "median"
    kwargs: dict[str, Any] = field(default_factory=dict)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, Primitive)


def encode_choice(value: Any) -> Any:
    """Optuna stores scalars only: other YAML values are stored as their JSON text."""
    return value if _is_scalar(value) else json.dumps(value, sort_keys=True)


def distribution(key: str, p: Param) -> BaseDistribution:
    """The Optuna distribution of one search-space entry; errors name the key."""
    where = f"search_space.{key}"
    if p.type == "categorical":
        if not p.choices:
            raise ConfigError(f"{where}: a categorical needs a non-empty 'choices' list")
        encoded = [encode_choice(c) for c in p.choices]
        if len(set(map(json.dumps, encoded))) != len(encoded):
            raise ConfigError(f"{where}: choices {p.choices} repeat a value")
        return CategoricalDistribution(encoded)
    if p.low is None or p.high is None:
        raise ConfigError(f"{where}: a {p.type} needs 'low' and 'high'")
    if p.choices is not None:
        raise ConfigError(f"{where}: 'choices' belongs to type: categorical, not {p.type}")
    if not p.low < p.high:
        raise ConfigError(f"{where}: low={p.low} must be below high={p.high}")
    if p.log and p.step is not None:
        raise ConfigError(f"{where}: 'log' and 'step' exclude each other (Optuna's rule)")
    if p.log and p.low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {p.low}")
    if p.type == "int":
        for name in ("low", "high", "step"):
            v = getattr(p, name)
            if v is not None and float(v) != int(v):
                raise ConfigError(f"{where}: {name}={v} is not an integer")
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)


def distributions(space: dict[str, Param]) -> dict[str, BaseDistribution]:
    if not space:
        raise ConfigError("search_space is empty: name at least one config key to search")
    return {k: distribution(k, p) for k, p in space.items()}


def decode(value: Any, dist: BaseDistribution) -> Any:
    """A trial's stored value -> the config value (undoing :func:`encode_choice`)."""
    if isinstance(dist, CategoricalDistribution) and isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if not _is_scalar(decoded) else value
    return value


def grid(space: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """The grid sampler's search space: every categorical choice, every step of a stepped
    int/float range."""
    out: dict[str, list[Any]] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            out[key] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = int(math.floor((d.high - d.low) / d.step + 1e-9)) + 1
            out[key] = [float(round(d.low + i * d.step, 12)) for i in range(n)]
        else:
            raise ConfigError(
                f"search_space.{key}: the grid sampler needs choices or a step, not a "
                "continuous or log range"
            )
    return out


def grid_size(space: dict[str, BaseDistribution]) -> int:
    return int(np.prod([len(v) for v in grid(space).values()]))


class AskTellGrid(optuna.samplers.GridSampler):
    """Optuna's grid sampler for medlit's ask-and-tell workers. Optuna's ``after_trial``
    calls ``study.stop()`` once the grid is covered, which raises outside
    ``study.optimize`` and so failed the ``tell`` of every grid sweep's last trial (left
    RUNNING, the worker crashed). The workers stop on their own: the grid's size is their
    ``n_trials`` budget (``Worker``), and what each trial draws is still the sampler's."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Any,
    ) -> None:
        return None


def make_sampler(
    cfg: SamplerConfig, space: dict[str, BaseDistribution], offset: int = 0
) -> optuna.samplers.BaseSampler:
    """The sweep's sampler, seeded with ``seed + offset`` (the trial number, see
    :func:`ask`)."""
    seed = None if cfg.seed is None else cfg.seed + offset
    kwargs = dict(cfg.kwargs)
    try:
        if cfg.name == "tpe":
            # constant_liar: running trials count as bad guesses, so parallel workers
            # spread out instead of sampling the same promising point (Optuna's advice
            # for distributed optimisation).
            kwargs.setdefault("constant_liar", True)
            return optuna.samplers.TPESampler(seed=seed, **kwargs)
        if cfg.name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **kwargs)
        if cfg.name == "cmaes":
            if any(isinstance(d, CategoricalDistribution) for d in space.values()):
                # CMA-ES samples categoricals independently at random; say so.
                kwargs.setdefault("warn_independent_sampling", True)
            return optuna.samplers.CmaEsSampler(seed=seed, **kwargs)
        # The grid's order is one shuffle for the whole study, never reseeded by trial:
        # a trial's grid point is an index into it, given by the sampler in place at
        # ``ask`` and read back by the trial's own (see :func:`ask`); with a shuffle per
        # trial number the two disagreed, and a grid sweep repeated some points and
        # skipped others.
        return AskTellGrid(grid(space), seed=cfg.seed, **kwargs)
    except TypeError as e:
        raise ConfigError(f"sampler.kwargs for '{cfg.name}': {e}") from None


def ask(
    study: optuna.Study, cfg: SamplerConfig, space: dict[str, BaseDistribution]
) -> optuna.Trial:
    """A new trial with its values drawn by a sampler seeded with ``seed + trial number``.

    Two workers started with the same command used to build the same seeded sampler and
    draw identical values. The trial number is unique in the study (the storage gives it
    out), so seeding each trial's draw with it keeps the values of a seeded sweep
    reproducible and different in every trial, whichever worker draws them. Values are
    drawn after ``ask`` through the public ``suggest_*`` calls, so the sampler in place
    is the trial's own; what a multivariate sampler draws jointly at ``ask`` comes from the
    sampler of this worker's previous trial, also seeded by a unique number."""
    trial = study.ask()
    study.sampler = make_sampler(cfg, space, trial.number)
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial


def make_pruner(cfg: PrunerConfig) -> optuna.pruners.BasePruner:
    try:
        if cfg.name == "median":
            return optuna.pruners.MedianPruner(**cfg.kwargs)
        if cfg.name == "hyperband":
            return optuna.pruners.HyperbandPruner(**cfg.kwargs)
        if cfg.name == "percentile":
            return optuna.pruners.PercentilePruner(**cfg.kwargs)
        if cfg.name == "threshold":
            return optuna.pruners.ThresholdPruner(**cfg.kwargs)
        return optuna.pruners.NopPruner()
    except TypeError as e:
        raise ConfigError(f"pruner.kwargs for '{cfg.name}': {e}") from None


def to_cli(key: str, value: Any) -> str:
    """``--key=value`` as LightningCLI parses it (YAML flow style for lists and dicts)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, int | str):
        text = str(value)
    else:
        text = json.dumps(value)  # JSON is YAML flow style
    return f"--{key}={text}"
