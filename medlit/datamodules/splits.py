"""Case-level (or group-level) train/val/test splits: seeded ratios, k-fold, or a split file.

Splitting happens over *groups* (a patient, a lesion) so that no group ever lands in two
splits; for BraTS a group is a case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlit import yamlsafe
from medlit.constraints import Folds, Fraction, NonNegativeInt
from medlit.errors import ConfigError, Report

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Which cases train, validate and test: seeded ratios, k folds, or a split file, over
    groups (a case, a lesion, a patient), so that no group is in two splits. The data
    module's ``seed`` seeds it.

    Args:
        val_fraction: share of groups for validation (ignored with num_folds).
        test_fraction: share of groups held out for the final test.
        split_file: YAML/JSON ``{train: [...], val: [...], test: [...]}`` of group ids;
            overrides the ratios.
        num_folds: k for k-fold cross-validation over the non-test groups.
        fold: which fold validates (0-based).
    """

    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15
    split_file: str | None = None
    num_folds: Folds | None = None
    fold: NonNegativeInt = 0


# The fields of Split, once flat arguments of the data modules (medlit.deprecation.moved).
SPLIT_KEYS = ("val_fraction", "test_fraction", "split_file", "num_folds", "fold")


def split_file_problems(path: str | Path, known: Sequence[str]) -> list[tuple[str, str]]:
    """Every problem of a split file, as ``(id, problem)``: not a mapping of
    train/val/test lists, an id in two splits, an id the dataset does not have."""
    path = Path(path)
    if not path.is_file():
        return [("split_file", "split file does not exist")]
    try:
        data = yamlsafe.load(path.read_text(), str(path)) or {}
    except ConfigError as e:
        return [("split_file", str(e).removeprefix(f"{path}: "))]
    if not isinstance(data, dict) or not set(data) <= set(SPLITS) or "train" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        return [
            ("split_file", f"expected a mapping with keys {SPLITS} (train required), found {found}")
        ]
    problems = []
    seen: dict[str, str] = {}
    known_set = set(known)
    for split in SPLITS:
        ids = data.get(split) or []
        if not isinstance(ids, list):
            problems.append((split, f"{split} is not a list of ids"))
            continue
        for i in map(str, ids):
            if i in seen:
                problems.append((i, f"{i} is in both {seen[i]} and {split}"))
            elif i not in known_set:
                problems.append((i, f"{split} names {i}, which is not in the dataset"))
            seen.setdefault(i, split)
    return problems


def _summary(path: str | Path, problems: list[tuple[str, str]]) -> str:
    shown = "; ".join(p for _, p in problems[:3])
    more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
    return f"split file {path}: {shown}{more}"


def check_split_file(path: str | Path | None, known: Sequence[str], report: Report) -> bool:
    """Whether the split file (if any) is sound: each problem is an error of its id in a
    collecting report; a strict one raises one ``ConfigError`` naming the first three."""
    problems = split_file_problems(path, known) if path else []
    if problems and report.strict:
        report.refuse(ConfigError(_summary(path, problems)), "split_file", path)
    for case, problem in problems:
        report.error(case, path, problem)
    return not problems


def read_split_file(path: str | Path, known: Sequence[str]) -> dict[str, list[str]]:
    """Read ``{train: [...], val: [...], test: [...]}`` (YAML or JSON) and check it."""
    if problems := split_file_problems(path, known):
        raise ConfigError(_summary(path, problems))
    data = yamlsafe.load(Path(path).read_text(), str(path)) or {}
    return {s: [str(x) for x in data.get(s) or []] for s in SPLITS}


def make_splits(
    groups: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    num_folds: Folds | None = None,
    fold: NonNegativeInt = 0,
) -> dict[str, list[str]]:
    """Split unique ``groups`` by seeded shuffling.

    The test set is always held out first with ``test_fraction`` (so it stays the same
    for every fold); the rest is either split by ``val_fraction`` or, with ``num_folds``,
    into k folds of which ``fold`` is validation.
    """
    unique = sorted(set(groups))
    order = list(np.random.default_rng(seed).permutation(len(unique)))
    ids = [unique[i] for i in order]
    n_test = int(round(test_fraction * len(ids)))
    test, rest = ids[:n_test], ids[n_test:]
    if num_folds:
        if not 0 <= fold < num_folds:
            raise ConfigError(f"fold={fold} is outside 0..{num_folds - 1}")
        if len(rest) < num_folds:
            raise ConfigError(f"{len(rest)} cases cannot make {num_folds} folds")
        val = rest[fold::num_folds]
    else:
        n_val = max(int(round(val_fraction * len(ids))), 1 if val_fraction > 0 else 0)
        val = rest[:n_val]
    held = set(val)
    train = [i for i in rest if i not in held]
    if not train:
        raise ConfigError(
            f"no cases left for training ({len(ids)} cases, val_fraction={val_fraction}, "
            f"test_fraction={test_fraction})"
        )
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def split_groups(groups: Sequence[str], split: Split, seed: int) -> dict[str, list[str]]:
    """A data module's split of ``groups``: from ``split.split_file`` when given, else
    seeded ratios or folds."""
    if split.split_file:
        return read_split_file(split.split_file, list(groups))
    return make_splits(
        groups, split.val_fraction, split.test_fraction, seed, split.num_folds, split.fold
    )
