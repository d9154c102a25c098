"""Every numeric argument of medlit's own classes carries its range (medlit.constraints),
so a value outside it is refused when the config is parsed, naming the key, before a data
check or a tracking run; a sweep's search range is checked against the same ranges."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path

import mlflow
import pytest

import medlit.datamodules as datamodules
import medlit.tasks as tasks
from medlit.callbacks import Speedups
from medlit.datamodules.base import BaseDataModule
from medlit.errors import ConfigError
from medlit.tasks.base import BaseTask
from medlit.tracking import MLflowTracker
from tests.test_fit import tiny

# Arguments that take any number of their type, and why.
EXEMPT = {
    "seed": "any integer seeds a generator",
    "display_channel": "an index; -1 counts from the end",
    "hu_window": "Hounsfield units are negative below water; low < high is checked",
}


def _classes() -> list[type]:
    found = [
        obj
        for module in (tasks, datamodules)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, BaseTask | BaseDataModule)
    ]
    groups = [datamodules.Loader, datamodules.Split, datamodules.Subsets]
    return [*found, *groups, MLflowTracker, Speedups]


def _leaves(hint: object) -> list[object]:
    """The scalar types inside ``hint`` (through Optional, unions, lists and tuples)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType, list, tuple) and args:
        return [leaf for arg in args for leaf in _leaves(arg)]
    return [hint]


def test_every_numeric_argument_has_a_range() -> None:
    classes = _classes()
    assert len(classes) >= 12
    unconstrained = []
    for cls in classes:
        init = cls if dataclasses.is_dataclass(cls) else cls.__init__
        hints = typing.get_type_hints(init)
        for name in inspect.signature(init).parameters:
            if name in EXEMPT or name not in hints:
                continue
            if any(leaf in (int, float) for leaf in _leaves(hints[name])):
                unconstrained.append(f"{cls.__name__}.{name}: {hints[name]}")
    assert not unconstrained, "\n".join(unconstrained)


def _runs(uri: str) -> int:
    client = mlflow.MlflowClient(uri)
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.mark.parametrize(
    ("override", "key", "rule"),
    [
        ("--data.loader.batch_size=0", "loader.batch_size", "PositiveInt"),
        ("--model.lr=-1", "lr", "PositiveFloat"),
        ("--data.split.val_fraction=1.5", "split.val_fraction", "Fraction"),
        ("--data.split.num_folds=1", "split.num_folds", "Folds"),
        ("--model.threshold=2", "threshold", "ClosedUnitInterval"),
    ],
)
def test_a_value_out_of_range_is_refused_at_parse_time_naming_the_key(
    brats_root: Path,
    tracking_uri: str,
    capsys: pytest.CaptureFixture,
    override: str,
    key: str,
    rule: str,
) -> None:
    from medlit.fit import main
    from medlit.usage import UsageError

    before = _runs(tracking_uri)
    with pytest.raises(UsageError) as done:  # the command prints it and exits with 2
        main(tiny(brats_root, tracking_uri, override))
    message = str(done.value)
    assert f".{key} (from flag {override})" in message and f"Not of type {rule}" in message
    assert _runs(tracking_uri) == before  # nothing was opened


def test_a_search_range_outside_an_argument_s_range_stops_the_sweep_before_a_trial(
    tmp_path: Path, brats_root: Path, tracking_uri: str
) -> None:
    from medlit.sweep import load
    from medlit.tuning.worker import Worker
    from tests.test_sweep import write_sweep

    sweep = write_sweep(
        tmp_path,
        brats_root,
        tracking_uri,
        search_space={
            "model.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "data.loader.batch_size": {"type": "int", "low": 0, "high": 8, "step": 4},
        },
    )
    cfg, _ = load([str(sweep)])
    with pytest.raises(ConfigError, match=r"loader.batch_size.*PositiveInt"):
        Worker(cfg)
