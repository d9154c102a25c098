"""BraTS DataModule: validated, cached cases; case-level splits; 2D/2.5D training slices;
whole-case evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import albumentations as A
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
from medlit.datasets.brats.phantom import write_brats
from medlit.datasets.brats.source import (
    BRATS_HELP,
    DICOM_SERIES,
    LAYOUTS,
    MODALITIES,
    BraTSCase,
    Layout,
    Modality,
    Preprocessing,
    check_case,
    detect_layout,
    discover_cases,
    label_targets,
    labels_from_regions,
    nested_regions,
    prediction_cases,
    preprocess_case,
)
from medlit.datasets.io.cache import CacheEntry, OnTheFly, VolumeCache
from medlit.datasets.io.dicom import DicomSettings
from medlit.datasets.io.volume import write_uncropped
from medlit.datasets.patches import patch_dims
from medlit.errors import ConfigError, DatasetNotFoundError, InvalidCaseError, Report

log = logging.getLogger(__name__)


class BraTSDataModule(BaseDataModule):
    """BraTS 2020 / 2021 / 2023-GLI brain tumour MRI.

    Args:
        root: folder holding the case folders (the layout is detected from file names).
        demo: when ``root`` is empty or missing, first write a small seeded synthetic
            dataset there in the official 2021 layout.
        demo_cases: number of synthetic cases written by ``demo``.
        year: force a layout (``2020``, ``2021``, ``2023``) instead of detecting it.
        modalities: input contrasts, in channel order (2023's t1n/t1c/t2w/t2f map to
            t1/t1ce/t2/flair).
        et_label: label value of enhancing tumour; default the release's (4, or 3 in 2023).
        label_values: every label value allowed in a segmentation; default the release's
            set. Later GLI releases add e.g. 4 = resection cavity: [0, 1, 2, 3, 4].
        target: ``regions``: WT/TC/ET masks (multi-label); ``labels``: classes 0 bg,
            1 NCR, 2 edema, 3 ET (evaluation then scores WT/TC/ET); ``modality``: the
            ``target_modality`` image (modality synthesis, ``target_image``) from the
            ``modalities`` inputs.
        target_modality: the contrast to synthesise with ``target: modality``.
        context_slices: neighbouring slices on each side given as extra channels (2.5D).
        patch_size: training patches: one side in voxels for square 2D/2.5D slices, or
            ``[z, y, x]`` for 3D patches (a 3D network, ``Segmentation3DTask``), read
            straight from the memory-mapped cache with nnU-Net's foreground
            oversampling (``medlit.datasets.patches``).
        foreground_fraction: share of training patches forced to contain tumour (3D: of
            every batch, as nnU-Net's ``oversample_foreground_percent``).
        samples_per_epoch: training patches per epoch.
        augment: 2D: random flips, affine warps and per-channel intensity scaling; 3D:
            nnU-Net's default augmentation (MONAI transforms, ``Augment3D``).
        elastic: 3D: add elastic deformation to ``augment`` (slow; off in nnU-Net too).
        target_spacing: (z, y, x) mm to resample every case to in the cache (images
            linearly, labels nearest-neighbour); evaluation and written predictions stay
            on each case's own grid. None keeps the release's spacing.
        split: which cases train, validate and test (a group is a case): ``val_fraction``,
            ``test_fraction``, ``split_file``, ``num_folds``, ``fold``.
        seed: seed of the split and of the demo data.
        cache_dir: cache of preprocessed cases; default ``$MEDLIT_CACHE_DIR`` or
            ``~/.cache/medlit``.
        loader: ``batch_size`` (training patches per batch; evaluation takes one case
            per batch) and ``num_workers``.
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
        root: str = "data/BraTS2021",
        demo: bool = False,
        demo_cases: PositiveInt = 30,
        year: Literal["2020", "2021", "2023"] | None = None,
        modalities: list[Modality] | None = None,
        et_label: PositiveInt | None = None,
        label_values: list[NonNegativeInt] | None = None,
        target: Literal["regions", "labels", "modality"] = "regions",
        target_modality: Modality = "flair",
        context_slices: NonNegativeInt = 0,
        patch_size: PositiveInt | list[PositiveInt] = 128,
        foreground_fraction: ClosedUnitInterval = 0.33,
        samples_per_epoch: PositiveInt = 2000,
        augment: bool = True,
        elastic: bool = False,
        target_spacing: list[PositiveFloat] | None = None,
        split: Split = Split(),
        seed: int = 42,
        cache_dir: str | None = None,
        loader: Loader = Loader(batch_size=16),
        dicom: DicomSettings = DicomSettings(),
        **legacy: Any,
    ) -> None:
        super().__init__(root)
        self.save_hyperparameters(logger=False)  # the resolved config is logged whole
        groups = self.settings(legacy, split=split, loader=loader, dicom=dicom)
        self.split_settings: Split = groups["split"]
        self.dicom_settings: DicomSettings = groups["dicom"]
        self.modalities = tuple(modalities or MODALITIES)
        self.synthesis = target == "modality"
        if self.synthesis:
            if target_modality in self.modalities:
                raise ConfigError(
                    f"data.target_modality={target_modality!r} is also an input "
                    f"(data.modalities={list(self.modalities)})"
                )
            # Cached and cropped with the inputs, as their last channel; split off per item.
            self.modalities = (*self.modalities, target_modality)
        self.patch_3d = patch_dims(patch_size, context_slices, self.synthesis)
        if target_spacing is not None and len(target_spacing) != 3:
            raise ConfigError(f"data.target_spacing={target_spacing} must be [z, y, x] mm")
        self.cases: dict[str, list[BraTSCase]] = {}
        self._layout: Layout | None = None
        self._caches: dict[bool, tuple[VolumeCache, Preprocessing]] = {}

    # ---- discovery, checks and caching -------------------------------------------------

    @property
    def num_channels(self) -> int:
        inputs = len(self.modalities) - int(self.synthesis)
        return inputs * (2 * self.hparams["context_slices"] + 1)

    def label_names(self) -> dict[int, str]:
        if self.synthesis:
            return {}
        if self.predict_input is not None:  # predict_from() read the input's release
            et = self._predict_et
        else:  # the training release's (2021's when neither data.year nor the data says)
            et = self.hparams["et_label"] or LAYOUTS[self._dicom_year()].et_label
        return {
            1: "necrotic tumour core (NCR)",
            2: "peritumoral edema (ED)",
            et: "enhancing tumour (ET)",
        }

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Training patch: (z, y, x) for 3D patches, (side, side) for slices."""
        side = self.hparams["patch_size"]
        return self.patch_3d or (side, side)

    def written_regions(self, regions: np.ndarray) -> np.ndarray:
        """A label map holds nested regions: a voxel of ET is also TC and WT, one of TC
        also WT (independent sigmoid regions need not nest until they are written)."""
        return nested_regions(regions)

    def lesionwise(self) -> tuple[str, bool]:
        """BraTS 2023 and later rank by lesion-wise Dice and HD95: on by default for them."""
        try:
            year = self._layout_and_labels()[0]
        except Exception:  # noqa: BLE001 - no data yet (prediction): the default
            return "BraTS-GLI", False
        return "BraTS-GLI", int(year) >= 2023

    def _layout_and_labels(self) -> tuple[str, int, tuple[int, ...]]:
        h = self.hparams
        if self._layout is None:  # detected once: it lists the whole root
            self._layout = LAYOUTS[h["year"]] if h["year"] else detect_layout(self.root)
        layout = self._layout
        et = h["et_label"] if h["et_label"] is not None else layout.et_label
        labels = tuple(h["label_values"]) if h["label_values"] else layout.labels
        return layout.year, et, labels

    def _cache(self, require_seg: bool = True) -> tuple[VolumeCache, Preprocessing]:
        """The cache and preprocessing of labelled (or unlabelled) cases, made once per
        split (its name hashes every case id)."""
        if require_seg in self._caches:
            return self._caches[require_seg]
        year, _, labels = self._layout_and_labels()
        spacing = self.hparams["target_spacing"]
        prep = Preprocessing(
            self.modalities, labels, require_seg, tuple(spacing) if spacing else None
        )
        cache = VolumeCache(
            cache_root(
                self.hparams["cache_dir"],
                f"brats-{year}",
                self.root,
                (c.case_id for c in self.cases.get("predict", [])),
            ),
            asdict(prep),
        )
        self._caches[require_seg] = cache, prep
        return cache, prep

    def _entries(self, cases: list[BraTSCase], require_seg: bool = True) -> list[CacheEntry]:
        """Cache entries of ``cases``, checking and preprocessing those not cached yet."""
        cache, prep = self._cache(require_seg)
        return [cache.get(c.case_id, c.sources, partial(preprocess_case, c, prep)) for c in cases]

    # ---- the pipeline (run by BaseDataModule.run_pipeline) -------------------------------

    def demo_data(self) -> tuple[Callable[[Path], object], str]:
        h = self.hparams
        return (
            lambda root: write_brats(root, h["demo_cases"], seed=h["seed"]),
            f"{h['demo_cases']} synthetic BraTS cases (2021 layout)",
        )

    def discover(self, report: Report) -> dict[str, BraTSCase]:
        """Every case folder of the layout, labelled or not; no labelled case at all is an
        error (training needs them)."""
        if not self.root.exists():
            raise DatasetNotFoundError(f"BraTS root {self.root} does not exist. {BRATS_HELP}")
        year, _, _ = self._layout_and_labels()
        found = {c.case_id: c for c in discover_cases(self.root, LAYOUTS[year], self.modalities)}
        if not any(c.seg is not None for c in found.values()):
            report.refuse(
                DatasetNotFoundError(
                    f"no case under {self.root} has a segmentation; training needs labelled "
                    f"cases. {BRATS_HELP}"
                ),
                "dataset",
                self.root,
            )
        return found

    def split(self, cases: dict[str, BraTSCase], report: Report) -> dict[str, list[str]]:
        """Labelled cases only, by case (a split file's unknown or repeated ids are errors);
        unlabelled ones are for prediction."""
        h = self.hparams
        labelled = [i for i, c in cases.items() if c.seg is not None]
        if not check_split_file(self.split_settings.split_file, labelled, report) or not labelled:
            # only a collecting report gets here
            ids = {"train": [], "val": [], "test": []}
        else:
            ids = split_groups(labelled, self.split_settings, h["seed"])
        self.cases = {s: [cases[i] for i in v] for s, v in ids.items()}
        self.cases["predict"] = list(cases.values())
        self._caches = {}
        return ids

    def prepare_case(self, case_id: str, case: BraTSCase, report: Report, deep: bool) -> bool:
        """Every check of the case's files (``check_case``), then its cache entry; a case
        without a segmentation (prediction only) is checked with a warning."""
        labelled = case.seg is not None
        if not labelled:
            year, _, _ = self._layout_and_labels()
            report.warning(
                case_id,
                LAYOUTS[year].file(case.folder, "seg"),
                "no segmentation: the case is not used for training or evaluation",
            )
        cache, prep = self._cache(require_seg=labelled)
        entry, _ = self.check_and_cache(
            cache,
            case_id,
            case.sources,
            partial(check_case, case, prep),
            partial(preprocess_case, case, prep),
            report,
            deep=deep and labelled,
        )
        return entry is None or entry.built

    def finish(self, report: Report) -> str:
        return f", {sum(e.nbytes() for e in self.entries.values()) / 1e6:.1f} MB"

    def predict_from(self, path: Path, num_classes: int | None = None) -> None:
        """Predict on ``path`` (a case folder, or a folder of case folders in any BraTS
        layout) instead of ``root``; the training data need not be present.

        Cases are checked and preprocessed as they are read (nothing is cached). A missing
        modality is refused here, before anything runs, naming the case and the file.
        """
        path = Path(path).expanduser()
        if not path.is_dir():
            raise DatasetNotFoundError(
                f"--input {path}: BraTS input is a case folder or a folder of case folders"
            )
        if self.synthesis:
            raise ConfigError("modality synthesis writes with medlit.generate, not predict")
        layout, cases = prediction_cases(path, self.hparams["year"], self.modalities)
        self._predict_cases(cases, layout, path)

    def dicom_rules(self) -> dict[str, str | None]:
        """Each modality's series by its SeriesDescription (searched, case-insensitive):
        ``flair``; ``t2`` but not T2* or FLAIR; ``t1ce``: T1 with post / gd / gad / ce /
        contrast / +c, or T1C; ``t1``: T1 without those, not T1C, not FLAIR."""
        rules = {**DICOM_SERIES, **self.dicom_settings.series}
        return {m: rules.get(m) for m in self.modalities}

    def dicom_codes(self) -> dict[int, dict[str, Any]]:
        names = self.label_names()
        et = next(v for v, n in names.items() if "(ET)" in n)
        abnormal = "MorphologicallyAbnormalStructure"
        return {
            1: {"category": abnormal, "type": "Necrosis"},
            2: {"category": abnormal, "type": "Edema"},
            et: {"category": abnormal, "type": "Neoplasm"},
        }

    def deploy_state(self) -> dict[str, Any] | None:
        if self.synthesis:
            return None
        h = self.hparams
        return {
            **self.deploy_common(),
            "reader": "brats",
            "year": h["year"],
            "default_year": self._dicom_year(),
            "modalities": list(self.modalities),
            "et_label": h["et_label"],
            "target_spacing": h["target_spacing"],
        }

    def _dicom_year(self) -> str:
        """The release whose labels a case converted from DICOM is written in."""
        return self.hparams["year"] or (
            detect_layout(self.root).year if self.root.is_dir() else "2021"
        )

    def predict_from_images(self, cases: dict[str, list[Path]], source: Path) -> None:
        """Cases converted from DICOM, written in the labels of data.year, else of the
        training data's release (2021's when that is not here)."""
        if self.synthesis:
            raise ConfigError("modality synthesis writes with medlit.generate, not predict")
        year = self._dicom_year()
        found = [
            BraTSCase(cid, files[0].parent, dict(zip(self.modalities, files, strict=True)), None)
            for cid, files in cases.items()
        ]
        self._predict_cases(found, LAYOUTS[year], source)

    def _predict_cases(self, cases: list[BraTSCase], layout: Layout, path: Path) -> None:
        for case in cases:
            for modality, file in case.images.items():
                if not file.exists():
                    raise InvalidCaseError(
                        case.case_id,
                        file,
                        f"modality {modality} is missing; the model takes "
                        f"{', '.join(self.modalities)} ({len(self.modalities)} channels)",
                    )
        et = self.hparams["et_label"]
        self._predict_et = et if et is not None else layout.et_label
        spacing = self.hparams["target_spacing"]
        prep = Preprocessing(
            self.modalities, layout.labels, False, tuple(spacing) if spacing else None
        )
        self.predict_input = path
        self.datasets["predict"] = OnTheFly(
            [BraTSCase(c.case_id, c.folder, c.images, None) for c in cases],
            partial(_predict_item, prep=prep),
        )
        log.info("BraTS %s: %d %s cases to predict", path, len(cases), layout.year)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", collate_fn=one_item_batch)

    def write_prediction(
        self, case_id: str, regions: np.ndarray, folder: Path, meta: dict | None = None
    ) -> Path:
        """Write predicted WT/TC/ET regions of a cropped case as ``<case>.nii.gz``: the
        release's label values, uncropped, with the exact geometry of the input images.
        ``meta`` is the case's metadata when it is not one of the data module's own."""
        if meta is None:
            meta = self.case_meta(case_id)
            _, et, _ = self._layout_and_labels()
        else:
            et = self._predict_et
        labels = labels_from_regions(regions, et).astype(np.uint8)
        return write_uncropped(labels, meta, folder / f"{case_id}.nii.gz")

    def write_synthesis(self, case_id: str, volume: np.ndarray, folder: Path) -> Path:
        """The synthesised target modality (the last of ``modalities``) of a case as
        ``<case>/<case>_<modality>-synth.nii.gz``, uncropped, on the input's geometry."""
        path = folder / case_id / f"{case_id}_{self.modalities[-1]}-synth.nii.gz"
        return write_uncropped(np.asarray(volume, np.float32), self.case_meta(case_id), path)

    # ---- datasets ----------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        h = self.hparams
        if stage == "predict" and self.predict_input is not None:  # predict_from() chose
            return
        self.index()
        _, et, _ = self._layout_and_labels()
        eval_target = partial(label_targets, et_label=et, target="regions")
        augment = None
        if stage == "fit" and not self.patch_3d and h["augment"]:
            augment = A.Compose(
                [
                    A.HorizontalFlip(p=0.5),
                    A.Affine(
                        scale=(0.85, 1.15),
                        rotate=(-15, 15),
                        translate_percent=(-0.05, 0.05),
                        border_mode=0,
                        fill=0,
                        fill_mask=0,
                        p=0.5,
                    ),
                    # Per-channel intensity noise would break the input-target relation.
                    *(
                        []
                        if self.synthesis
                        else [A.MultiplicativeNoise(multiplier=(0.9, 1.1), per_channel=True, p=0.3)]
                    ),
                ]
            )
        self.volume_datasets(
            stage,
            lambda split: self._entries(self.cases[split], require_seg=split != "predict"),
            partial(label_targets, et_label=et, target=h["target"]),
            eval_target,
            augment,
            int(self.synthesis),
        )


def _predict_item(case: BraTSCase, prep: Preprocessing) -> dict:
    """One unlabelled case, checked and preprocessed as for the cache: (C, Z, Y, X) image
    and the metadata that writes its prediction back onto the input's grid."""
    arrays, meta = preprocess_case(case, prep)
    return {
        "image": torch.from_numpy(arrays["image"].astype(np.float32)),
        "case_id": case.case_id,
        "meta": meta,
    }
