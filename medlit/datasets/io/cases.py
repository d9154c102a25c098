"""A cropped, normalised volume case as the arrays a cache entry (or a prediction) holds:
shared by the volumetric datasets and by ``medlit.deploy``, which runs without torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_LOCATIONS = 10_000


def foreground_index(seg: np.ndarray, limit: int = MAX_LOCATIONS) -> np.ndarray:
    """(N, 4) int32 rows ``label, z, y, x``: for every non-zero label of ``seg``, its voxels,
    or an even sample of ``limit`` of them (deterministic: the cache's ``verify`` rebuilds
    and compares it). Built once per case, with the cache entry."""
    seg = np.asarray(seg)
    rows = []
    for value in np.unique(seg):
        if value == 0:
            continue
        where = np.argwhere(seg == value)
        if len(where) > limit:
            where = where[np.linspace(0, len(where) - 1, limit).round().astype(np.int64)]
        rows.append(np.concatenate([np.full((len(where), 1), value), where], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def cached_case(
    image: np.ndarray,
    seg: np.ndarray | None,
    native_zyx: Sequence[float],
    spacing_zyx: Sequence[float] | None,
    meta: dict,
) -> tuple[dict[str, np.ndarray], dict]:
    """A cropped, normalised volume case as its cache entry, shared by the volumetric
    datasets: ``image`` (C, z, y, x) resampled to ``spacing_zyx`` when set and different
    (linearly), stored float16; the labels resampled nearest-neighbour as ``seg``, kept
    on the source's grid as ``seg_native`` when resampled (evaluation scores there), and
    their ``fg_locations``. ``meta`` gains ``has_seg``, ``spacing_zyx`` (the cached
    grid's) and, labelled, ``fg_slices``."""
    from medlit.datasets.io.volume import resample_array

    resampled = spacing_zyx is not None and not np.allclose(native_zyx, spacing_zyx)
    if resampled:
        image = np.stack([resample_array(c, native_zyx, spacing_zyx, labels=False) for c in image])
    arrays = {"image": image.astype(np.float16)}
    if seg is not None:
        if resampled:
            arrays["seg_native"] = seg
            seg = resample_array(seg, native_zyx, spacing_zyx, labels=True)
        arrays["seg"] = seg
        arrays["fg_locations"] = foreground_index(seg)
    meta = {
        **meta,
        "has_seg": seg is not None,
        "spacing_zyx": list(spacing_zyx if resampled else native_zyx),
    }
    if seg is not None:
        # The slices holding foreground, which 2D/2.5D training oversamples: from here, a
        # training set-up reads no label volume (entries built before compute them).
        meta["fg_slices"] = np.flatnonzero(seg.reshape(len(seg), -1).any(1)).tolist()
    return arrays, meta
