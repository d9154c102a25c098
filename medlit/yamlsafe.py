"""YAML with a bound on what its aliases expand to.

``yaml.safe_load`` of a "billion laughs" file is quick: its aliases become shared
objects. Whatever walks the result later (jsonargparse copying and validating a config,
``str()`` of a split file's ids) expands every reference, and a 1 KB file then takes
gigabytes and minutes. Every YAML file a user hands medlit (experiment and sweep configs,
split files) is first composed into its node graph, where an alias is one shared node,
and the size it would expand to is counted there, in time linear in the file.
"""

from __future__ import annotations

from typing import Any

import yaml

from medlit.errors import ConfigError

# Far above any real config (a shipped experiment is ~150 nodes; a split file of 10,000
# case ids is ~10,000) and far below what hurts.
MAX_NODES = 1_000_000


def expanded_size(text: str) -> int:
    """Nodes the document would have with every alias expanded (capped just above
    :data:`MAX_NODES`; a self-referencing alias counts as unbounded)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return 0
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in size:
            continue
        if isinstance(node, yaml.ScalarNode):
            size[key] = 1
            continue
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else list(node.value)
        )
        if done:
            open_nodes.discard(key)
            size[key] = min(1 + sum(size[id(c)] for c in children), MAX_NODES + 1)
            continue
        if key in open_nodes or any(id(c) in open_nodes for c in children):
            return MAX_NODES + 1  # an alias to an ancestor: expands forever
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)]


def check(text: str, source: str) -> None:
    """Refuse YAML whose aliases expand past :data:`MAX_NODES`, or that does not parse
    (``ConfigError`` naming ``source``)."""
    try:
        n = expanded_size(text)
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply to read") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None
    if n > MAX_NODES:
        raise ConfigError(
            f"{source}: its YAML aliases expand to more than {MAX_NODES:,} values (an alias "
            "bomb?); refused before parsing"
        )


def load(text: str, source: str) -> Any:
    """``yaml.safe_load`` after :func:`check`."""
    check(text, source)
    return yaml.safe_load(text)
