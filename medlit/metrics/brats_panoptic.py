"""The panoptic lesion metrics of the newer BraTS scorer (``brats-evaluation``, its
``configs/config_gli.yaml``), computed by panoptica itself.

Per region (WT = labels 1, 2, 3; TC = 1, 3; ET = 3, the 2023 labels): lesions are the
26-connected components of the label group, matched one to one by maximum bipartite
matching on Dice (any overlap, Dice > 1e-6, may match); then the lesion counts TP, FP and
FN, the segmentation quality (mean Dice ``sq_dsc`` and HD95 ``sq_hd95`` over the matched
pairs), and the panoptic quality ``pq_dsc`` = sq_dsc × the detection F1. Edge cases as
the config sets them: Dice 0 and HD95 infinite when there are no true positives,
undefined (NaN) without any lesion on either side.

panoptica (Apache-2.0, the BraTS organisers' own library) is called at run time, from
the optional extra ``medlit[lesions]`` (it is also a dev dependency): the metric is the
scorer's by construction. The evaluator is built here with panoptica's classes, the same
settings as ``config_gli.yaml``, rather than by reading ``brats-evaluation``'s file,
which is AGPL-3.0 and stays a test oracle. medlit's own lesion-wise metric (the 2023
ranking rule, dilation-grouped) is :mod:`medlit.metrics.brats_lesionwise`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from medlit.errors import ConfigError

# region -> the 2023 label values it merges
GROUPS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
COLUMNS = ("tp", "fp", "fn", "sq_dsc", "pq_dsc", "sq_hd95")


def evaluator(groups: dict[str, Sequence[int]] | None = None) -> Any:
    """A ``Panoptica_Evaluator`` set up as ``config_gli.yaml`` sets it."""
    try:
        from panoptica import (
            ConnectedComponentsInstanceApproximator,
            InputType,
            MaxBipartiteMatching,
            Metric,
            Panoptica_Evaluator,
        )
        from panoptica.utils.edge_case_handling import (
            EdgeCaseHandler,
            EdgeCaseResult,
            MetricZeroTPEdgeCaseHandling,
        )
        from panoptica.utils.label_group import LabelMergeGroup
        from panoptica.utils.segmentation_class import SegmentationClassGroups
    except ImportError:
        raise ConfigError(
            "the panoptic BraTS metrics need panoptica: pip install 'medlit[lesions]'"
        ) from None

    def zero_tp(no_tp: EdgeCaseResult) -> MetricZeroTPEdgeCaseHandling:
        return MetricZeroTPEdgeCaseHandling(
            empty_prediction_result=no_tp,
            empty_reference_result=no_tp,
            no_instances_result=EdgeCaseResult.NAN,
            normal=no_tp,
        )

    handler = EdgeCaseHandler(
        listmetric_zeroTP_handling={
            Metric.DSC: zero_tp(EdgeCaseResult.ZERO),
            Metric.NSD: zero_tp(EdgeCaseResult.ZERO),
            Metric.HD95: zero_tp(EdgeCaseResult.INF),
        },
        empty_list_std=EdgeCaseResult.NAN,
    )
    metrics = [Metric.DSC, Metric.NSD, Metric.HD95]
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        edge_case_handler=handler,
        segmentation_class_groups=SegmentationClassGroups(
            {k: LabelMergeGroup(list(v)) for k, v in (groups or GROUPS).items()}
        ),
        instance_metrics=metrics,
        global_metrics=metrics,
        verbose=False,
    )


def panoptic(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], evaluator_: Any = None
) -> dict[str, float]:
    """Per region of two 2023-label maps (Z, Y, X; ``spacing`` in the same order):
    ``<region>_<tp|fp|fn|sq_dsc|pq_dsc|sq_hd95>`` (regions ``wt``, ``tc``, ``et``)."""
    from panoptica import disable_citation_reminder

    disable_citation_reminder()
    ev = evaluator_ if evaluator_ is not None else evaluator()
    with warnings.catch_warnings():  # NSD's "default threshold" notice, once per call
        warnings.simplefilter("ignore", UserWarning)
        results = ev.evaluate(
            np.asarray(pred, np.uint8),
            np.asarray(ref, np.uint8),
            voxelspacing=tuple(float(s) for s in spacing),
            verbose=False,
        )
    out: dict[str, float] = {}
    for region, result in results.items():
        values = result.to_dict()
        for column in COLUMNS:
            out[f"{region}_{column}"] = float(values[column])
    return out
