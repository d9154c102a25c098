"""Any volumetric segmentation dataset in the nnU-Net v2 raw or MSD format: checked,
fingerprinted and cached cases (nnU-Net's preprocessing), case-level splits, 2D/2.5D
slices or 3D patches for training, whole cases for evaluation and prediction."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from medlit.constraints import ClosedUnitInterval, NonNegativeInt, PositiveFloat, PositiveInt
from medlit.datamodules.base import (
    BaseDataModule,
    Loader,
    cache_root,
    one_item_batch,
)
from medlit.datamodules.splits import SPLIT_KEYS, Split, check_split_file, split_groups
from medlit.datasets.io.cache import CacheEntry, OnTheFly, VolumeCache
from medlit.datasets.io.dicom import DicomSettings
from medlit.datasets.io.files import atomic_write
from medlit.datasets.io.volume import write_uncropped
from medlit.datasets.patches import patch_dims
from medlit.datasets.volumes.phantom import write_phantoms
from medlit.datasets.volumes.source import (
    STATS_VOXELS,
    VOLUMES_HELP,
    DatasetSpec,
    Preprocessing,
    VolumeCase,
    check_case,
    foreground_statistics,
    nonzero_box,
    nonzero_mask,
    parse_spec,
    prediction_cases,
    preprocess_case,
    read_spec,
    sample_foreground,
    target_spacing,
)
from medlit.errors import ConfigError, DatasetNotFoundError, InvalidCaseError, Report

log = logging.getLogger(__name__)
FINGERPRINT_VERSION = 2  # bump when what _fingerprint computes changes


class VolumeDataModule(BaseDataModule):
    """Any volumetric segmentation dataset in the nnU-Net v2 raw or the Medical
    Segmentation Decathlon format (detected from ``dataset.json``), preprocessed as
    nnU-Net does.

    The targets follow ``dataset.json``'s labels: one softmax class per label (the task's
    ``target: labels``, ``num_classes`` = labels including the background), or, when a
    label is a list of values (nnU-Net's region-based training), one sigmoid region each
    (``target: regions``). Every foreground label or region is evaluated as a region
    named as in ``dataset.json``; predictions are written as label maps in the dataset's
    values and file ending, on each input's own grid.

    Args:
        root: the dataset folder that holds ``dataset.json``.
        demo: when ``root`` is empty or missing, first write a seeded synthetic dataset
            there in the nnU-Net v2 raw format (anisotropic CT-like phantoms, two labels).
        demo_cases: number of synthetic cases written by ``demo``.
        target_spacing: (z, y, x) mm every case is resampled to in the cache (images
            linearly, labels nearest-neighbour); ``auto``: nnU-Net's rule over the
            training cases (their median spacing; for a much coarser and shorter axis
            its 10th percentile); ``none``: each case keeps its own (2D/2.5D only).
            Evaluation and written predictions stay on each case's own grid.
        context_slices: neighbouring slices on each side given as extra channels (2.5D).
        patch_size: one side for square 2D/2.5D slices, or ``[z, y, x]`` for 3D patches
            (``Segmentation3DTask``).
        foreground_fraction: share of training samples forced to contain foreground.
        samples_per_epoch: training slices or patches per epoch.
        augment: 3D: nnU-Net's default augmentation (``Augment3D``); 2D: flips and
            affine warps.
        elastic: 3D: add elastic deformation.
        intensity_samples: foreground voxels drawn (with replacement, evenly over the
            training cases) for the CT channels' statistics; nnU-Net's 10e7.
        fingerprint_from: the cases the fingerprint reads: ``train`` (the training split
            only: nothing of the validation cases leaks into preprocessing), or
            ``train_val`` (every case but the test split's, as nnU-Net fingerprints all of
            imagesTr). ``medlit.cv`` sets ``train_val`` for its folds, so that they share
            one preprocessing (and cache), and an ensemble of them sees one input.
        split: which cases train, validate and test (``val_fraction``,
            ``test_fraction``, ``split_file``, ``num_folds``, ``fold``).
        seed: seed of the split and of the demo data.
        cache_dir: cache of preprocessed cases; default ``$MEDLIT_CACHE_DIR`` or
            ``~/.cache/medlit``.
        loader: ``batch_size`` and ``num_workers``.
        dicom: DICOM input (``medlit.predict --input`` a DICOM folder): the
            SeriesDescription pattern of each channel and the DICOM SEG's segment codes
            (:class:`medlit.datasets.io.dicom.DicomSettings`).
    """

    moved_arguments: ClassVar[dict[str, str]] = {
        **BaseDataModule.moved_arguments,
        **{k: f"split.{k}" for k in SPLIT_KEYS},
    }

    def __init__(
        self,
        root: str = "data/Dataset001",
        demo: bool = False,
        demo_cases: PositiveInt = 24,
        target_spacing: list[PositiveFloat] | Literal["auto", "none"] = "auto",
        context_slices: NonNegativeInt = 0,
        patch_size: PositiveInt | list[PositiveInt] = 64,
        foreground_fraction: ClosedUnitInterval = 0.33,
        samples_per_epoch: PositiveInt = 2000,
        augment: bool = True,
        elastic: bool = False,
        intensity_samples: PositiveInt = STATS_VOXELS,
        fingerprint_from: Literal["train", "train_val"] = "train",
        split: Split = Split(),
        seed: int = 42,
        cache_dir: str | None = None,
        loader: Loader = Loader(batch_size=16),
        dicom: DicomSettings = DicomSettings(),
        **legacy: Any,
    ) -> None:
        super().__init__(root)
        self.save_hyperparameters(logger=False)
        groups = self.settings(legacy, split=split, loader=loader, dicom=dicom)
        self.split_settings: Split = groups["split"]
        self.dicom_settings: DicomSettings = groups["dicom"]
        self.patch_3d = patch_dims(patch_size, context_slices)
        if isinstance(target_spacing, list) and len(target_spacing) != 3:
            raise ConfigError(f"data.target_spacing={target_spacing} must be [z, y, x] mm")
        if self.patch_3d and target_spacing == "none":
            raise ConfigError(
                "3D patches need one grid for every case: set data.target_spacing to auto "
                "or [z, y, x] mm"
            )
        self.spec: DatasetSpec | None = None
        self.cases: dict[str, list[VolumeCase]] = {}
        self._folder: Path | None = None
        # nnU-Net's dataset fingerprint of the training cases (target spacing, CT
        # intensity statistics): computed once, kept in checkpoints (state_dict), so that
        # prediction preprocesses new cases as training did without the training data.
        self.fingerprint: dict[str, Any] | None = None
        self.saved_dataset: dict[str, Any] | None = None  # dataset.json from a checkpoint

    # ---- what the data are ----------------------------------------------------------------

    def _spec(self) -> DatasetSpec:
        """dataset.json's channels, labels and cases; from the checkpoint (prediction)
        when ``root`` has no dataset.json."""
        if self.spec is None:
            report = Report()
            if self.saved_dataset is not None and not (self.root / "dataset.json").exists():
                raw = {**self.saved_dataset, "training": []}
                self.spec = parse_spec(raw, Path("checkpoint:dataset.json"), report)
            else:
                self.spec = read_spec(self.root, report)
            if self.spec is None:
                raise InvalidCaseError(
                    "dataset", self.root / "dataset.json", report.errors[0].problem
                )
        return self.spec

    @property
    def num_channels(self) -> int | None:
        try:
            spec = self._spec()
        except (DatasetNotFoundError, InvalidCaseError):
            return None  # not written yet (demo) or broken: the pipeline says why
        return len(spec.channels) * (2 * self.hparams["context_slices"] + 1)

    def segmentation_target(self) -> tuple[str, int, list[str]] | None:
        try:
            labels = self._spec().labels
        except (DatasetNotFoundError, InvalidCaseError):
            return None
        names = [n for n, _ in labels.foreground]
        if labels.region_based:
            return "regions", len(names), names
        return "labels", len(labels.names), names

    def label_names(self) -> dict[int, str]:
        labels = self._spec().labels
        names = [n for n, _ in labels.foreground]
        if labels.region_based:  # each region writes its regions_class_order value
            return dict(zip(labels.regions_class_order, names, strict=True))
        return {v[0]: n for n, v in labels.foreground}

    def grid_spacing(self) -> tuple[float, float, float] | None:
        wanted = self.hparams["target_spacing"]
        if isinstance(wanted, list):
            return tuple(float(s) for s in wanted)  # type: ignore[return-value]
        if wanted == "auto" and self.fingerprint is not None:
            return tuple(self.fingerprint["target_spacing"])  # type: ignore[return-value]
        return None

    @property
    def patch_size(self) -> tuple[int, ...]:
        side = self.hparams["patch_size"]
        return self.patch_3d or (side, side)

    # ---- the fingerprint, the cache ---------------------------------------------------------

    def cv_folds(self, num_folds: int | None) -> list[list[str]]:
        """The k folds, each fingerprinted on all the non-test cases (nnU-Net's choice):
        one target spacing, normalisation and cache for every fold, so that the folds'
        models see the same input and ensemble."""
        return [[*o, "--data.fingerprint_from=train_val"] for o in super().cv_folds(num_folds)]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to preprocess and write new cases as training did, with
        the training data gone: the fingerprint and dataset.json (less its case lists)."""
        if not self.fingerprint or self.spec is None:
            return {}
        raw = {k: v for k, v in self.spec.raw.items() if k not in ("training", "test")}
        return {"fingerprint": self.fingerprint, "dataset_json": raw}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fingerprint = state.get("fingerprint") or self.fingerprint
        self.saved_dataset = state.get("dataset_json") or self.saved_dataset

    def _fingerprint(self) -> dict[str, Any]:
        """nnU-Net's fingerprint of the training cases: their spacings and cropped shapes
        (for the target spacing), the share of each case its non-zero crop keeps, and the
        intensity statistics of the foreground of each CT channel. Unlike nnU-Net, which
        fingerprints every case of imagesTr (its cross-validation holds nothing out), only
        the training split is read by default: nothing of the validation or test cases
        leaks into their preprocessing (``fingerprint_from: train_val`` adds the
        validation cases, for cross-validation). Kept in the cache folder, keyed by dataset.json and the
        training files' sizes and times; a fingerprint loaded from a checkpoint wins
        (prediction)."""
        if self.fingerprint is not None:
            return self.fingerprint
        spec = self._spec()
        train = list(self.cases.get("train") or [])
        if self.hparams["fingerprint_from"] == "train_val":  # in case order: every fold's
            train = sorted([*train, *(self.cases.get("val") or [])], key=lambda c: c.case_id)
        if not train:
            raise ConfigError("no training cases to take the dataset's fingerprint from")
        samples_total = self.hparams["intensity_samples"]
        stats = sorted(
            (str(p), p.stat().st_size, p.stat().st_mtime_ns) for c in train for p in c.sources
        )
        blob = json.dumps([FINGERPRINT_VERSION, spec.raw, samples_total, stats], default=str)
        path = (
            self._cache_dir() / f"fingerprint-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
        )
        if path.exists():
            self.fingerprint = json.loads(path.read_text())
            return self.fingerprint
        ct = [i for i in range(len(spec.channels)) if spec.normalisation(i) == "ct"]
        per_case = max(int(samples_total // len(train)), 1)
        spacings, shapes, kept, samples = [], [], [], {i: [] for i in ct}
        for case in train:
            read = check_case(case, spec, Report(strict=True), need_label=True)
            assert read is not None  # a strict report raised
            channels, seg, geometry = read
            box = nonzero_box(nonzero_mask(channels))
            crop = tuple(slice(a, b) for a, b in box)
            spacings.append(list(geometry.spacing_zyx))
            shapes.append([b - a for a, b in box])
            kept.append(float(np.prod(shapes[-1]) / np.prod(channels[0].shape)))
            if ct:
                picked = sample_foreground([channels[i][crop] for i in ct], seg[crop], per_case)
                for i, values in zip(ct, picked, strict=True):
                    samples[i].append(values.astype(np.float32))
        fingerprint = {
            "spacings": spacings,
            "shapes_after_crop": shapes,
            "median_relative_size_after_cropping": float(np.median(kept)),
            "target_spacing": list(target_spacing(np.array(spacings), np.array(shapes))),
            "foreground_intensity_properties_per_channel": {
                str(i): foreground_statistics(np.concatenate(samples[i]))
                if any(len(v) for v in samples[i])
                else None
                for i in ct
            },
        }
        atomic_write(path, lambda p: p.write_text(json.dumps(fingerprint, indent=1)))
        self.fingerprint = fingerprint
        log.info(
            "dataset fingerprint of %d training cases: target spacing %s mm (z, y, x)",
            len(train),
            [round(s, 4) for s in fingerprint["target_spacing"]],
        )
        return fingerprint

    def _cache_dir(self) -> Path:
        """The cache folder, named once per split (its name hashes every case id)."""
        if self._folder is None:
            ids = (c.case_id for c in self.cases.get("predict", []))
            self._folder = cache_root(self.hparams["cache_dir"], "volumes", self.root, ids)
        return self._folder

    def _preprocessing(self) -> Preprocessing:
        spec = self._spec()
        wanted = self.hparams["target_spacing"]
        stats: list[dict | None] = [None] * len(spec.channels)
        fp = self._fingerprint()
        for i in range(len(spec.channels)):
            if spec.normalisation(i) == "ct":
                stats[i] = fp["foreground_intensity_properties_per_channel"].get(str(i))
                if stats[i] is None:
                    raise ConfigError(
                        f"channel {i} ({spec.channels[i]}) is CT but the training cases have "
                        "no foreground voxels to take its intensity statistics from"
                    )
        if wanted == "auto":
            spacing = tuple(fp["target_spacing"])
        elif wanted == "none":
            spacing = None
        else:
            spacing = tuple(float(s) for s in wanted)
        # nnU-Net z-scores within the non-zero region when cropping to it removed a
        # quarter or more of the median case (its use_mask_for_norm).
        norm_mask = fp["median_relative_size_after_cropping"] < 0.75
        return Preprocessing(
            spec.channels,
            tuple(sorted(spec.labels.allowed)),
            spacing,  # type: ignore[arg-type]
            tuple(stats),
            norm_mask,
        )

    def _cache(self) -> tuple[VolumeCache, Preprocessing]:
        prep = self._preprocessing()
        return VolumeCache(self._cache_dir(), asdict(prep)), prep

    def _entries(self, cases: list[VolumeCase]) -> list[CacheEntry]:
        cache, prep = self._cache()
        spec = self._spec()
        return [
            cache.get(c.case_id, c.sources, partial(preprocess_case, c, spec, prep)) for c in cases
        ]

    # ---- the pipeline (BaseDataModule.run_pipeline) -------------------------------------------

    def demo_data(self) -> tuple[Callable[[Path], object], str]:
        h = self.hparams
        return (
            lambda root: write_phantoms(root, h["demo_cases"], seed=h["seed"]),
            f"{h['demo_cases']} synthetic CT-like cases (nnU-Net v2 raw format)",
        )

    def discover(self, report: Report) -> dict[str, VolumeCase]:
        self.spec = None
        spec = read_spec(self.root, report)
        if spec is None:  # dataset.json itself is broken (only a collecting report)
            return {}
        self.spec = spec
        if not any(c.label is not None for c in spec.cases.values()):
            report.refuse(
                DatasetNotFoundError(
                    f"no labelled case in {self.root}; training needs them. {VOLUMES_HELP}"
                ),
                "dataset",
                self.root,
            )
        return spec.cases

    def split(self, cases: dict[str, VolumeCase], report: Report) -> dict[str, list[str]]:
        labelled = [i for i, c in cases.items() if c.label is not None]
        if not check_split_file(self.split_settings.split_file, labelled, report) or not labelled:
            ids = {"train": [], "val": [], "test": []}
        else:
            ids = split_groups(labelled, self.split_settings, self.hparams["seed"])
        self.cases = {s: [cases[i] for i in v] for s, v in ids.items()}
        self.cases["predict"] = list(cases.values())
        self._folder = None
        return ids

    def prepare_case(self, case_id: str, case: VolumeCase, report: Report, deep: bool) -> bool:
        spec = self._spec()
        labelled = case.label is not None
        if not report.strict:  # medlit.check: every check, nothing cached or fingerprinted
            check_case(case, spec, report, need_label=False)
            return True
        cache, prep = self._cache()
        entry, _ = self.check_and_cache(
            cache,
            case_id,
            case.sources,
            partial(check_case, case, spec, need_label=labelled),
            partial(preprocess_case, case, spec, prep),
            report,
            deep=deep and labelled,
        )
        return entry is None or entry.built

    def finish(self, report: Report) -> str:
        if not self.entries:
            return ""
        return f", {sum(e.nbytes() for e in self.entries.values()) / 1e6:.1f} MB"

    # ---- prediction input, outputs ------------------------------------------------------------

    def predict_from(self, path: Path, num_classes: int | None = None) -> None:
        """Predict on ``path``: one image file (one channel, or an MSD 4D file) or a folder
        of ``<case>_<XXXX><ending>`` channel files (nnU-Net's imagesTs), preprocessed with
        the fingerprint of the checkpoint's training data, and its channels and labels
        (the checkpoint's dataset.json; the training data need not be present)."""
        spec = self._spec()
        path = Path(path).expanduser()
        cases = prediction_cases(path, spec)
        self._predict_cases(cases, path)

    def dicom_rules(self) -> dict[str, str | None]:
        """dataset.json's channels, in order; a model of one channel takes every series
        (each its own case), one of several takes the series whose SeriesDescription
        contains the channel's name (``T2``, ``ADC``), unless data.dicom.series says."""
        channels = self._spec().channels
        own = self.dicom_settings.series
        if len(channels) == 1:
            return {channels[0]: own.get(channels[0])}
        return {c: own.get(c, re.escape(c)) for c in channels}

    def deploy_state(self) -> dict[str, Any] | None:
        spec = self._spec()
        raw = {k: v for k, v in spec.raw.items() if k not in ("training", "test")}
        return {
            **self.deploy_common(),
            "reader": "volumes",
            "dataset_json": raw,
            "preprocessing": asdict(self._preprocessing()),
        }

    def predict_from_images(self, cases: dict[str, list[Path]], source: Path) -> None:
        self._predict_cases([VolumeCase(c, files, None) for c, files in cases.items()], source)

    def _predict_cases(self, cases: list[VolumeCase], path: Path) -> None:
        spec = self._spec()
        if self.fingerprint is None:
            raise ConfigError(
                "the checkpoint holds no dataset fingerprint (target spacing, intensity "
                "statistics) to preprocess new cases with; predict with a checkpoint of a "
                "medlit run of this data module"
            )
        for case in cases:
            for f in case.images:
                if not f.exists():
                    raise InvalidCaseError(
                        case.case_id, f, f"channel file is missing ({', '.join(spec.channels)})"
                    )
        prep = self._preprocessing()
        self.predict_input = path
        self.datasets["predict"] = OnTheFly(cases, partial(_predict_item, spec=spec, prep=prep))
        log.info("%s: %d cases to predict", path, len(cases))

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", collate_fn=one_item_batch)

    def write_prediction(
        self, case_id: str, regions: np.ndarray, folder: Path, meta: dict | None = None
    ) -> Path:
        """A case's predicted regions as a label map in dataset.json's values (region-based:
        ``regions_class_order``), uncropped, on the input's exact geometry, as
        ``<case><file_ending>``."""
        meta = meta if meta is not None else self.case_meta(case_id)
        spec = self._spec()
        labels = spec.labels.label_map(regions).astype(np.uint8)
        ending = spec.file_ending if spec.format == "nnunet" else ".nii.gz"
        return write_uncropped(labels, meta, folder / f"{case_id}{ending}")

    # ---- datasets -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        h = self.hparams
        if stage == "predict" and self.predict_input is not None:
            return
        self.index()
        labels = self._spec().labels
        augment = None
        if stage == "fit" and not self.patch_3d and h["augment"]:
            import albumentations as A

            augment = A.Compose(
                [
                    A.HorizontalFlip(p=0.5),
                    A.Affine(
                        scale=(0.85, 1.15),
                        rotate=(-15, 15),
                        border_mode=0,
                        fill=0,
                        fill_mask=0,
                        p=0.5,
                    ),
                ]
            )
        self.volume_datasets(
            stage,
            lambda split: self._entries(self.cases[split]),
            labels.training_target,
            labels.regions,
            augment,
        )


def _predict_item(case: VolumeCase, spec: DatasetSpec, prep: Preprocessing) -> dict:
    arrays, meta = preprocess_case(case, spec, prep)
    return {
        "image": torch.from_numpy(arrays["image"].astype(np.float32)),
        "case_id": case.case_id,
        "meta": meta,
    }
