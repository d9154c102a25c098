"""Label descriptions that viewers load beside a label map, so that each value shows
with its name and colour: ITK-SNAP's ``label_descriptions.txt`` (Segmentation > Import
Label Descriptions) and a 3D Slicer colour table (``.ctbl``, loaded with the label map
as its colour node). Written by hand: neither viewer's format has a maintained Python
writer, and both are a few lines of text."""

from __future__ import annotations

from pathlib import Path

from medlit.datasets.io.files import atomic_write

# Distinct colours for labels 1, 2, ... (matplotlib's tab10), repeated past ten.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _colours(names: dict[int, str]) -> list[tuple[int, str, tuple[int, int, int]]]:
    return [(v, names[v], PALETTE[i % len(PALETTE)]) for i, v in enumerate(sorted(names))]


def itksnap_labels(names: dict[int, str]) -> str:
    """ITK-SNAP's label description file: ``IDX R G B A VIS MSH "LABEL"`` per label, the
    clear label (0) first."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "################################################",
        '    0     0    0    0        0  0  0    "Clear Label"',
    ]
    for value, name, (r, g, b) in _colours(names):
        label = name.replace('"', "'")
        lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{label}"')
    return "\n".join(lines) + "\n"


def slicer_colour_table(names: dict[int, str]) -> str:
    """A 3D Slicer colour table: ``index name R G B A`` per label (names without spaces,
    which the format separates fields by), background transparent."""
    lines = ["# Color table file written by medlit", f"# {len(names) + 1} values"]
    lines.append("0 background 0 0 0 0")
    for value, name, (r, g, b) in _colours(names):
        lines.append(f"{value} {'_'.join(name.split())} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def write_label_descriptions(folder: Path, names: dict[int, str]) -> list[Path]:
    """``label_descriptions.txt`` (ITK-SNAP) and ``labels.ctbl`` (3D Slicer) in ``folder``."""
    out = []
    for name, text in (
        ("label_descriptions.txt", itksnap_labels(names)),
        ("labels.ctbl", slicer_colour_table(names)),
    ):
        atomic_write(path := Path(folder) / name, lambda p, t=text: p.write_text(t))
        out.append(path)
    return out
