"""Renamed constructor arguments: configs written for the old name keep working.

A renamed argument stays in the signature under its old name (default None, documented
as deprecated), so that jsonargparse still accepts the old key in a YAML file or on the
command line; the constructor takes its value with :func:`renamed`, which says the new
name. The class lists its renames in ``renamed_arguments`` (new -> old), which the config
hash reads so that both spellings of one experiment are one experiment
(:func:`medlit.cli.config_hashes`).

An argument moved into a settings group (``batch_size`` into ``loader``) is no longer in
the signature: configs and overrides that use the old key are rewritten before they are
parsed (:func:`medlit.cli.upgrade_keys`, from the class's ``moved_arguments``, old ->
new), and Python callers pass it through ``**legacy``, read with :func:`moved`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, TypeVar

from medlit.errors import ConfigError

log = logging.getLogger("medlit")
T = TypeVar("T")


def renamed(owner: Any, old: str, old_value: T | None, new: str, new_value: T, default: T) -> T:
    """The value of argument ``new`` of ``owner``'s constructor, given that it was called
    ``old`` before: ``old_value`` when only the old name was set (with a warning naming
    the new one), else ``new_value``; both set to different values is an error."""
    if old_value is None:
        return new_value
    where = type(owner).__name__
    if new_value != default and new_value != old_value:
        raise ConfigError(
            f"{where}: both {old}={old_value} (its old name) and {new}={new_value} are set; "
            f"keep {new}"
        )
    message = f"{where}: `{old}` is deprecated and will be removed; use `{new}` (the same value)"
    warnings.warn(message, FutureWarning, stacklevel=3)
    log.warning(message)
    return old_value


def moved(owner: Any, legacy: dict[str, Any], groups: dict[str, Any]) -> dict[str, Any]:
    """Settings groups (``loader``, ``split``: dataclasses) updated with the arguments that
    moved into them, passed the old way (``batch_size=8`` for ``loader.batch_size``), each
    with a warning naming the new key. ``owner.moved_arguments`` maps old -> new; another
    key is a ``TypeError``, as for any unknown argument."""
    moves = type(owner).moved_arguments
    where = type(owner).__name__
    if unknown := sorted(set(legacy) - set(moves)):
        raise TypeError(f"{where}() got unexpected keyword arguments {unknown}")
    out = dict(groups)
    for old, value in legacy.items():
        group, field = moves[old].split(".")
        message = (
            f"{where}: `{old}` moved into the `{group}` group and will be removed; use "
            f"`{moves[old]}` (the same value)"
        )
        warnings.warn(message, FutureWarning, stacklevel=3)
        log.warning(message)
        out[group] = dataclasses.replace(out[group], **{field: value})
    return out
