"""LUNA16 DataModule: the official subsets as folds, checked and cached scans, 2.5D
detection slices with nodule boxes, whole-scan evaluation, candidate patches for
false-positive reduction, and lung segmentation from the ``seg-lungs-LUNA16`` masks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medlit.constraints import ClosedUnitInterval, NonNegativeInt, PositiveFloat, PositiveInt
from medlit.datamodules.base import (
    BaseDataModule,
    Loader,
    balanced_sampler,
    cache_root,
    one_item_batch,
)
from medlit.datasets.io.cache import OnTheFly, VolumeCache
from medlit.datasets.io.dicom import DicomSettings
from medlit.datasets.io.volume import Geometry
from medlit.datasets.luna16.phantom import write_luna16
from medlit.datasets.luna16.source import (
    ANNOTATION_COLUMNS,
    CANDIDATE_COLUMNS,
    LUNG_LABELS,
    LUNG_WINDOW,
    N_SUBSETS,
    LunaScan,
    LungPreprocessing,
    Preprocessing,
    TablePoints,
    candidate_patch,
    check_lung_scan,
    check_scan,
    discover_scans,
    locate,
    prediction_scans,
    preprocess_lungs,
    preprocess_scan,
    read_table,
    window,
    write_lungs,
    write_scan_grid,
    write_submission,
)
from medlit.datasets.luna16.torch import (
    CandidateDataset,
    NoduleSliceDataset,
    ScanDataset,
    detection_collate,
    first_item,
)
from medlit.datasets.patches import patch_dims
from medlit.errors import ConfigError, Report

if TYPE_CHECKING:
    from medlit.metrics.froc import FROCResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subsets:
    """LUNA16's official subsets as folds: which train, validate and test.

    Args:
        train: subsets (0-9) to train on; default every subset that is neither
            validation nor test.
        val: subsets that validate (checkpoint selection); default [8].
        test: held-out subsets, scored once with the best checkpoint; default [9].
    """

    train: list[NonNegativeInt] | None = None
    val: list[NonNegativeInt] | None = None
    test: list[NonNegativeInt] | None = None


class LUNA16DataModule(BaseDataModule):
    """LUNA16 lung CT: nodule detection, candidate false-positive reduction and lung
    segmentation.

    Args:
        root: folder holding ``subset0..9/``, ``annotations.csv`` and the other CSVs (any
            subsets may be missing: rows of absent scans are skipped).
        demo: when ``root`` is empty or missing, first write a seeded synthetic release
            there in the official layout.
        demo_scans: scans written by ``demo`` (spread round-robin over the 10 subsets).
        split: the official subsets (folds 0-9) of ``train`` (default: every subset that
            is neither validation nor test), ``val`` (default [8]) and ``test`` ([9]).
        target: ``boxes``: 2.5D slices with YOLO boxes (DetectionTask); ``candidates``:
            patches around ``candidates_file`` entries (ClassificationTask, false-positive
            reduction); ``lungs``: the two lungs of the ``seg-lungs-LUNA16`` masks (values
            3 and 4; other values are not lung) as a segmentation (SegmentationTask or
            Segmentation3DTask, ``target: labels``, 3 classes): 2D/2.5D slices or 3D
            patches of the windowed scan for training, whole scans for evaluation, scored
            and written on each scan's own grid (label maps in the masks' format). Its
            demo data are phantoms whose lungs are exact ellipsoids (known volumes).
        candidates_file: ``candidates_V2.csv`` (the revised list) or ``candidates.csv``.
        spacing: resample every scan to this voxel size (x, y, z mm) before caching;
            None keeps each scan's own grid.
        hu_window: Hounsfield window (low, high) mapped to [0, 1]; lung window by default.
        context_slices: neighbouring axial slices on each side as extra channels (1 gives
            three channels, the usual 2.5D input).
        patch_size: side of square training crops, in voxels; lungs: one side (2D/2.5D
            slices) or ``[z, y, x]`` (3D patches, with ``context_slices: 0``).
        positive_fraction: share of training slices that cut a nodule, the rest touching
            none; lungs: the share of training samples forced to hold lung.
        samples_per_epoch: training samples per epoch (slices, or candidates drawn by the
            balanced sampler).
        augment: CT augmentation (flips, small rotation and zoom, mild noise).
        candidate_size: side of candidate patches, in voxels.
        candidate_input: ``planes``: axial, coronal and sagittal planes through the
            candidate; ``slices``: ``2·context_slices + 1`` axial slices.
        balance: ``sampler`` draws training candidates with inverse class frequency (the
            candidate lists hold ~500 non-nodules per nodule).
        seed: seed of the demo data.
        cache_dir: cache of decoded (and resampled) scans; default ``$MEDLIT_CACHE_DIR``
            or ``~/.cache/medlit``.
        loader: ``batch_size`` (training samples per batch; evaluation: one scan, or this
            many candidates, per batch) and ``num_workers``.
        dicom: DICOM input (``medlit.predict --input`` a DICOM folder): the
            SeriesDescription pattern of each channel and the DICOM SEG's segment codes
            (:class:`medlit.datasets.io.dicom.DicomSettings`).
    """

    moved_arguments: ClassVar[dict[str, str]] = {
        **BaseDataModule.moved_arguments,
        "train_subsets": "split.train",
        "val_subsets": "split.val",
        "test_subsets": "split.test",
    }

    def __init__(
        self,
        root: str = "data/LUNA16",
        demo: bool = False,
        demo_scans: PositiveInt = 80,
        split: Subsets = Subsets(),
        target: Literal["boxes", "candidates", "lungs"] = "boxes",
        candidates_file: str = "candidates_V2.csv",
        spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = (1.0, 1.0, 1.0),
        hu_window: tuple[float, float] = LUNG_WINDOW,
        context_slices: NonNegativeInt = 1,
        patch_size: PositiveInt | list[PositiveInt] = 256,
        positive_fraction: ClosedUnitInterval = 0.5,
        samples_per_epoch: PositiveInt = 4000,
        augment: bool = True,
        candidate_size: PositiveInt = 48,
        candidate_input: Literal["planes", "slices"] = "planes",
        balance: Literal["sampler", "none"] = "sampler",
        seed: int = 42,
        cache_dir: str | None = None,
        loader: Loader = Loader(batch_size=16),
        dicom: DicomSettings = DicomSettings(),
        **legacy: Any,
    ) -> None:
        super().__init__(root)
        self.save_hyperparameters(logger=False)
        groups = self.settings(legacy, split=split, loader=loader, dicom=dicom)
        split, self.dicom_settings = groups["split"], groups["dicom"]
        val = list(split.val if split.val is not None else [8])
        test = list(split.test if split.test is not None else [9])
        train = list(
            split.train
            if split.train is not None
            else [k for k in range(N_SUBSETS) if k not in val + test]
        )
        for name, subsets in (("train", train), ("val", val), ("test", test)):
            if bad := [k for k in subsets if not 0 <= k < N_SUBSETS]:
                raise ConfigError(f"data.split.{name}: {bad} are not subsets 0-9")
        if overlap := (set(train) & set(val)) | (set(train) & set(test)) | (set(val) & set(test)):
            raise ConfigError(
                f"data: subsets {sorted(overlap)} are in two of train {train}, val {val}, "
                f"test {test}; each fold belongs to one split"
            )
        if hu_window[0] >= hu_window[1]:
            raise ConfigError(f"data.hu_window: low {hu_window[0]} must be below high")
        if target == "lungs":
            self.patch_3d = patch_dims(patch_size, context_slices)
        elif not isinstance(patch_size, int):
            raise ConfigError(
                f"data.patch_size={patch_size}: 3D patches are for target: lungs; "
                f"target: {target} takes one side"
            )
        self.subsets = {"train": train, "val": val, "test": test}
        self.tables: dict[str, pd.DataFrame] = {}

    # ---- what tasks ask of the data ----------------------------------------------------

    @property
    def num_channels(self) -> int:
        h = self.hparams
        if h["target"] == "candidates" and h["candidate_input"] == "planes":
            return 3
        return 2 * h["context_slices"] + 1

    @property
    def classes(self) -> tuple[str, ...]:
        target = self.hparams["target"]
        if target == "lungs":
            return tuple(LUNG_LABELS)
        return ("nodule",) if target == "boxes" else ("non_nodule", "nodule")

    def segmentation_target(self) -> tuple[str, int, list[str]] | None:
        if self.hparams["target"] != "lungs":
            return None
        return "labels", len(LUNG_LABELS) + 1, list(LUNG_LABELS)

    def label_names(self) -> dict[int, str]:
        if self.hparams["target"] != "lungs":
            return {}
        return {value: name for name, value in LUNG_LABELS.items()}

    def grid_spacing(self) -> tuple[float, float, float] | None:
        spacing = self.hparams["spacing"]
        if self.hparams["target"] != "lungs" or spacing is None:
            return None
        return tuple(float(s) for s in reversed(spacing))  # type: ignore[return-value]

    def cv_folds(self, num_folds: int | None) -> list[list[str]]:
        """The official subsets are LUNA16's folds: one fold per subset of ``split.train``
        and ``split.val`` present under ``root``, validating on it and training on the
        others (``split.test`` stays out); ``num_folds`` does not re-split them."""
        self.index()
        present = {s.subset for s in self.cases_found.values()}
        pool = sorted(
            s
            for s in {*self.subsets["train"], *self.subsets["val"]} & present
            if s not in self.subsets["test"]
        )
        if len(pool) < 2:
            raise ConfigError(
                f"LUNA16 cross-validation runs over its subsets: subsets {sorted(present)} "
                f"are under {self.root}, of which {pool} train or validate; 2 are needed"
            )
        if num_folds not in (None, len(pool)):
            log.info(
                "LUNA16's folds are its subsets: %d folds (subsets %s); --num_folds=%d does "
                "not re-split them",
                len(pool),
                pool,
                num_folds,
            )
        return [
            [f"--data.split.train={[o for o in pool if o != s]}", f"--data.split.val=[{s}]"]
            for s in pool
        ]

    def mirror_axes(self) -> tuple[int, ...]:
        """Lungs: not x, whose flip would swap the left lung and the right."""
        return (0, 1) if self.hparams["target"] == "lungs" else (0, 1, 2)

    @property
    def patch_size(self) -> tuple[int, ...]:
        side = self.hparams["patch_size"]
        return getattr(self, "patch_3d", None) or (side, side)

    @property
    def class_counts(self) -> list[int]:
        if self.hparams["target"] != "candidates":
            return []
        self._load()
        labels = self._candidate_rows("train")["class"].to_numpy()
        return np.bincount(labels, minlength=2).tolist()

    def reference(self, uids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Annotations and excluded findings of ``uids`` (official columns), for FROC."""
        self._load()
        pick = [*ANNOTATION_COLUMNS]
        ann, exc = self.tables["annotations"], self.tables["excluded"]
        return (
            ann[ann["seriesuid"].isin(uids)][pick].reset_index(drop=True),
            exc[exc["seriesuid"].isin(uids)][pick].reset_index(drop=True),
        )

    # ---- discovery, checks and caching ---------------------------------------------------

    def _tables(self) -> dict[str, tuple[Path, tuple[str, ...], bool]]:
        """The official CSVs: (path, columns, required) by name."""
        h = self.hparams
        return {
            "annotations": (
                self.root / "annotations.csv",
                ANNOTATION_COLUMNS,
                h["target"] != "lungs",
            ),
            "excluded": (self.root / "annotations_excluded.csv", ANNOTATION_COLUMNS, False),
            "candidates": (
                self.root / h["candidates_file"],
                CANDIDATE_COLUMNS,
                h["target"] == "candidates",
            ),
        }

    # ---- the pipeline (run by BaseDataModule.run_pipeline) -------------------------------

    def demo_data(self) -> tuple[Callable[[Path], object], str]:
        h = self.hparams
        lungs = "ellipsoids" if h["target"] == "lungs" else "anatomical"
        return (
            lambda root: write_luna16(root, h["demo_scans"], seed=h["seed"], lungs=lungs),
            f"{h['demo_scans']} synthetic LUNA16 scans"
            + (" (ellipsoid lungs)" if lungs == "ellipsoids" else ""),
        )

    def discover(self, report: Report) -> dict[str, LunaScan]:
        """The scans of ``subset*/`` (a seriesuid in two subsets is an error) and the
        official CSVs, checked row by row (schema, numbers, classes); rows of scans that
        are not under the root (subsets not downloaded) are skipped with one warning per
        file, repeated rows with a warning each."""
        h = self.hparams
        scans = discover_scans(self.root, report)
        self._raw_tables = {}
        for name, (path, columns, required) in self._tables().items():
            table = read_table(path, columns, required, report)
            absent = ~table["seriesuid"].isin(set(scans))
            if skipped := int(absent.sum()):
                report.warning(
                    path.name,
                    path,
                    f"{skipped} of {len(table)} rows name scans that are not under the root "
                    "(subsets not downloaded?): skipped",
                )
            dup = table.duplicated(["seriesuid", *columns[1:]], keep="first")
            for i in np.flatnonzero(dup):
                report.warning(
                    table["seriesuid"].iloc[i],
                    path,
                    f"line {int(table['line'].iloc[i])}: repeats an earlier row",
                )
            kept = table[~absent].reset_index(drop=True) if absent.any() else table
            self._raw_tables[name] = (path, kept)
        self._located = {name: [] for name in self._raw_tables}
        # Each table's rows by scan and its points as arrays, once: filtering
        # candidates_V2's 750k rows per scan would cost seconds per scan over a release.
        self._points = {
            name: TablePoints.of(table, "diameter_mm" if "diameter_mm" in table else None)
            for name, (_, table) in self._raw_tables.items()
        }
        spacing = tuple(h["spacing"]) if h["spacing"] is not None else None
        if h["target"] == "lungs":  # another layout (cached_case's): its own cache
            self._prep = LungPreprocessing(spacing, tuple(h["hu_window"]))
            folder = cache_root(h["cache_dir"], "luna16-lungs", self.root, scans)
        else:
            self._prep = Preprocessing(spacing)
            folder = cache_root(h["cache_dir"], "luna16", self.root, scans)
        self._cache = VolumeCache(folder, asdict(self._prep))
        return scans

    def split(self, cases: dict[str, LunaScan], report: Report) -> dict[str, list[str]]:
        """The official subsets as folds: ``split.train``, ``split.val``, ``split.test``;
        neither a training nor a test scan is an error."""
        ids = {
            split: sorted(u for u, s in cases.items() if s.subset in subsets)
            for split, subsets in self.subsets.items()
        }
        if not ids["train"] and not ids["test"]:
            report.refuse(
                ConfigError(
                    f"no scan of subsets {self.subsets['train']} (train) or "
                    f"{self.subsets['test']} (test) under {self.root}; found subsets "
                    f"{sorted({s.subset for s in cases.values()})}"
                ),
                "dataset",
                self.root,
            )
        return ids

    def prepare_case(self, uid: str, scan: LunaScan, report: Report, deep: bool) -> bool:
        """The scan checked (data size against its header, readable, 3D, finite, its lung
        mask) and cached, then every annotation and candidate of it placed in its grid (a
        point outside the scan is an error naming the CSV line). Lungs: the scan and its
        lung mask checked and cached as a segmentation case."""
        if self.hparams["target"] == "lungs":
            entry, _ = self.check_and_cache(
                self._cache,
                uid,
                scan.sources,
                partial(check_lung_scan, scan),
                partial(preprocess_lungs, scan, self._prep),
                report,
                deep,
            )
            return entry is None or entry.built
        entry, checked = self.check_and_cache(
            self._cache,
            uid,
            scan.sources,
            partial(check_scan, scan),
            partial(preprocess_scan, scan, self._prep),
            report,
            deep,
        )
        if entry is not None:
            meta = entry.meta
        elif checked is not None:  # checked, not cached: the scan's own grid
            image = checked[0]
            meta = {
                "geometry": Geometry.of(image).to_dict(),
                "shape": list(reversed(image.GetSize())),
            }
        else:
            return True
        for name, (path, _) in self._raw_tables.items():
            rows = self._points[name].of_scan(uid)
            self._located[name].append((rows, locate(self._points[name], rows, meta, path, report)))
        if self.hparams["target"] == "candidates" and uid not in self._points["candidates"].rows:
            report.warning(
                uid, scan.mhd, f"no row in {self.hparams['candidates_file']}: no candidates"
            )
        return entry is None or entry.built

    def finish(self, report: Report) -> str:
        """The tables of the prepared scans, with each row's voxel position (z, y, x) and
        radius in the cached grid."""
        if self.hparams["target"] == "lungs":
            self.tables = {name: table for name, (_, table) in self._raw_tables.items()}
            return f", {sum(e.nbytes() for e in self.entries.values()) / 1e6:.1f} MB"
        for name, (_, raw) in self._raw_tables.items():
            located = [(rows, at) for rows, at in self._located[name] if len(rows)]
            if not located:
                self.tables[name] = raw.iloc[:0].assign(z=0.0, y=0.0, x=0.0, radius_mm=0.0)
                continue
            # By seriesuid (stable), built once from the columns: sorting and re-indexing a
            # frame of 750k rows assembled from 888 pieces costs seconds of copies.
            positions = np.concatenate([r for r, _ in located])
            at = np.concatenate([a for _, a in located])
            order = np.argsort(raw["seriesuid"].to_numpy()[positions], kind="stable")
            take = positions[order]
            # NumPy columns as arrays (a frame of extension arrays is slow to build); the
            # others (seriesuid's strings) by their own take, which keeps their dtype.
            columns = {
                c: raw[c].to_numpy()[take]
                if isinstance(raw[c].dtype, np.dtype)
                else raw[c].array.take(take)
                for c in raw.columns
            }
            for i, c in enumerate(("z", "y", "x", "radius_mm")):
                columns[c] = at[order, i]
            self.tables[name] = pd.DataFrame(columns, copy=False)  # fresh arrays: 1.6 s less
        return (
            f", {sum(e.nbytes() for e in self.entries.values()) / 1e6:.1f} MB; "
            f"{len(self.tables['annotations'])} nodules, {len(self.tables['excluded'])} "
            f"excluded, {len(self.tables['candidates'])} candidates"
        )

    def _load(self) -> None:
        """The prepared scans and tables (prepared here on a rank that did not)."""
        if not self.prepared:
            self.run_pipeline(Report())

    def _nodules(self, uids: list[str]) -> list[np.ndarray]:
        ann = self.tables["annotations"]
        groups = {
            u: g[["z", "y", "x", "radius_mm"]].to_numpy() for u, g in ann.groupby("seriesuid")
        }
        return [groups.get(u, np.zeros((0, 4))) for u in uids]

    def _candidate_rows(self, split: str) -> pd.DataFrame:
        cands = self.tables["candidates"]
        return cands[cands["seriesuid"].isin(self.split_ids[split])]

    def _candidates(self, split: str) -> CandidateDataset:
        h = self.hparams
        rows = self._candidate_rows(split)
        centres = rows[["z", "y", "x"]].to_numpy()
        items = [
            (f"{uid}#{line}", uid, centre, int(label))
            for uid, line, centre, label in zip(
                rows["seriesuid"], rows["line"], centres, rows["class"], strict=True
            )
        ]
        return CandidateDataset(
            self.entries,
            items,
            h["hu_window"],
            h["candidate_size"],
            h["candidate_input"],
            h["context_slices"],
            augment=split == "train" and h["augment"],
        )

    # ---- datasets ------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.predict_input is not None:  # predict_from() chose
            return
        self._load()
        h = self.hparams
        entries = {s: [self.entries[u] for u in self.split_ids[s]] for s in self.split_ids}
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in splits:
            if not self.split_ids[split]:
                raise ConfigError(
                    f"no scan of subsets {self.subsets[split]} ({split}) under {self.root}"
                )
        if h["target"] == "lungs":
            self.volume_datasets(
                stage,
                lambda split: entries["test" if split == "predict" else split],
                _lung_classes,
                _lung_regions,
                _slice_augment(),
                foreground_fraction=h["positive_fraction"],
            )
            return
        for split in splits:
            if h["target"] == "candidates":
                self.datasets[split] = self._candidates(split)
            elif split == "train":
                self.datasets[split] = NoduleSliceDataset(
                    entries[split],
                    self._nodules(self.split_ids[split]),
                    h["hu_window"],
                    h["context_slices"],
                    h["patch_size"],
                    h["positive_fraction"],
                    h["samples_per_epoch"],
                    h["augment"],
                )
            else:
                self.datasets[split] = ScanDataset(
                    entries[split], self._nodules(self.split_ids[split]), h["hu_window"]
                )
        if stage == "predict":
            uids = self.split_ids["test"]
            self.datasets["predict"] = ScanDataset(
                [self.entries[u] for u in uids], None, h["hu_window"]
            )

    def predict_from(self, path: Path, num_classes: int | None = None) -> None:
        """Detect in ``path`` (a ``.mhd`` scan, or a folder searched recursively for them;
        ``seg-lungs-LUNA16`` masks are skipped) instead of the test subsets; the training
        data need not be present. Every header is checked here (3D, one channel, a data
        file of the declared size) before anything runs; scans are resampled and
        windowed as for training when they are read (nothing is cached)."""
        h = self.hparams
        if h["target"] == "candidates":
            raise ConfigError(
                "predict with the detector (target: boxes); a false-positive-reduction "
                "classifier re-ranks its candidates through --model.fpr_checkpoint"
            )
        path = Path(path).expanduser()
        scans = prediction_scans(path)
        spacing = tuple(h["spacing"]) if h["spacing"] is not None else None
        self.predict_input = path
        if h["target"] == "lungs":
            prep = LungPreprocessing(spacing, tuple(h["hu_window"]))
            item = partial(_predict_lungs, prep=prep)
        else:
            prep = Preprocessing(spacing)
            item = partial(_predict_item, prep=prep, hu_window=tuple(h["hu_window"]))
        self.datasets["predict"] = OnTheFly(scans, item)
        log.info("LUNA16 %s: %d scans to predict", path, len(scans))

    # DICOM series are converted to MetaImage, the format LUNA16 distributes.
    dicom_suffix: ClassVar[str] = ".mhd"

    def dicom_rules(self) -> dict[str, str | None]:
        """One CT channel: every CT series is a scan (named by its SeriesInstanceUID, as
        LUNA16's are), unless data.dicom.series gives CT a SeriesDescription pattern."""
        return {"CT": self.dicom_settings.series.get("CT")}

    def dicom_codes(self) -> dict[int, dict[str, Any]]:
        return {v: {"category": "AnatomicalStructure", "type": "Lung"} for v in self.label_names()}

    def deploy_state(self) -> dict[str, Any] | None:
        """Detection and lung segmentation (``medlit.deploy``): the grid the scans are
        resampled to and the HU window. The false-positive-reduction step (``target:
        candidates``) is the detector's re-ranking, not deployed alone."""
        h = self.hparams
        if h["target"] == "candidates":
            return None
        state = {
            "reader": "luna16" if h["target"] == "boxes" else "luna16_lungs",
            "spacing": list(h["spacing"]) if h["spacing"] is not None else None,
            "hu_window": list(h["hu_window"]),
            "dicom_rules": self.dicom_rules(),
            "dicom_suffix": self.dicom_suffix,
        }
        return {**self.deploy_common(), **state} if h["target"] == "lungs" else state

    def predict_from_images(self, cases: dict[str, list[Path]], source: Path) -> None:
        folders = {files[0].parent for files in cases.values()}
        if len(folders) != 1:
            raise ConfigError("converted DICOM scans must lie in one folder")
        self.predict_from(folders.pop())

    def _eval_loader(self, split: str) -> DataLoader:
        if self.hparams["target"] == "lungs":
            return self._loader(split, collate_fn=one_item_batch if split == "predict" else None)
        if self.hparams["target"] == "candidates":
            return self._loader(split, batch_size=self.batch_size)
        return self._loader(split, collate_fn=first_item)

    def train_dataloader(self) -> DataLoader:
        if self.hparams["target"] == "lungs":
            return self._loader("train")
        if self.hparams["target"] == "boxes":
            return self._loader("train", collate_fn=detection_collate)
        if self.hparams["balance"] != "sampler":
            return self._loader("train", shuffle=True)
        sampler = balanced_sampler(self.datasets["train"].labels, self.hparams["samples_per_epoch"])
        return self._loader("train", sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    # ---- outputs -------------------------------------------------------------------------

    def candidate_marks(self, ids: list[str], probs: np.ndarray) -> pd.DataFrame:
        """Candidates ``<seriesuid>#<line>`` with their nodule probability, as CAD marks."""
        cands = self.tables["candidates"].set_index(
            self.tables["candidates"]["seriesuid"]
            + "#"
            + self.tables["candidates"]["line"].astype(str)
        )
        rows = cands.loc[ids]
        return pd.DataFrame(
            {
                "seriesuid": rows["seriesuid"].to_numpy(),
                "coordX": rows["coordX"].to_numpy(),
                "coordY": rows["coordY"].to_numpy(),
                "coordZ": rows["coordZ"].to_numpy(),
                "probability": probs[:, -1],
            }
        )

    def write_submission(
        self, path: Path, ids: list[str], probs: np.ndarray, class_names: Sequence[str] = ()
    ) -> None:
        """False-positive reduction: the LUNA16 submission CSV of the scored candidates."""
        write_submission(path, self.candidate_marks(ids, probs))

    def write_prediction(
        self, case_id: str, regions: np.ndarray, folder: Path, meta: dict | None = None
    ) -> Path:
        """Lungs: a scan's predicted lungs as a mask in the ``seg-lungs-LUNA16`` format
        (values 3 and 4, ``<seriesuid>.mhd`` + ``.zraw``) on the scan's own grid, turned
        back from the identity direction the network saw to the scan's own axes."""
        if self.hparams["target"] != "lungs":
            return super().write_prediction(case_id, regions, folder, meta)
        return write_lungs(regions, meta or self.case_meta(case_id), folder / f"{case_id}.mhd")

    def write_map(
        self,
        case_id: str,
        values: np.ndarray,
        folder: Path,
        meta: dict | None = None,
        name: str = "uncertainty",
    ) -> Path:
        """Lungs: ``<seriesuid>_<name>.mhd`` + ``.zraw`` (float32) on the scan's own grid."""
        if self.hparams["target"] != "lungs":
            return super().write_map(case_id, values, folder, meta, name)
        meta = meta or self.case_meta(case_id)
        return write_scan_grid(values.astype(np.float32), meta, folder / f"{case_id}_{name}.mhd")

    def write_detections(self, path: Path, marks: pd.DataFrame) -> None:
        """The LUNA16 submission CSV ``seriesuid,coordX,coordY,coordZ,probability``."""
        write_submission(path, marks)

    def search_mask(self, case_id: str) -> np.ndarray | None:
        """The scan's cached lung mask (``seg-lungs-LUNA16``), or None without one."""
        entry = self.entries.get(case_id)
        return entry.arrays.get("lungs") if entry is not None else None

    def score_predictions(self, ids: list[str], probs: np.ndarray) -> FROCResult:
        """False-positive reduction scored as the challenge scores it: FROC/CPM over the
        scans whose candidates were classified."""
        from medlit.metrics.froc import froc

        marks = self.candidate_marks(ids, probs)
        uids = sorted(set(marks["seriesuid"]))
        annotations, excluded = self.reference(uids)
        return froc(marks, annotations, excluded, uids)

    def candidate_inputs(
        self, case_id: str, centres_zyx: np.ndarray, volume: np.ndarray | None = None
    ) -> np.ndarray:
        """Classifier inputs (N, 3, S, S) at voxel positions of a scan, made exactly as the
        false-positive-reduction training patches are (without augmentation). ``volume``:
        the scan's HU array when it is not one of the data module's (``medlit.predict``)."""
        h = self.hparams
        hu = volume if volume is not None else self.entries[case_id].arrays["image"]
        return np.stack(
            [
                candidate_patch(
                    hu,
                    c,
                    h["candidate_size"],
                    h["hu_window"],
                    h["candidate_input"],
                    h["context_slices"],
                )
                for c in centres_zyx
            ]
        ).astype(np.float32)


def _predict_item(scan: LunaScan, prep: Preprocessing, hu_window: tuple[float, ...]) -> dict:
    """One scan as ``ScanDataset`` gives it, plus its HU array (``hu``) for the
    false-positive-reduction patches."""
    arrays, meta = preprocess_scan(scan, prep)
    return {
        "image": torch.from_numpy(window(arrays["image"], hu_window)),
        "case_id": scan.seriesuid,
        "meta": meta,
        "nodules": torch.zeros(0, 4, dtype=torch.float64),
        "hu": arrays["image"],
    }


def _lung_classes(seg: np.ndarray) -> np.ndarray:
    """Training target: the cached class indices (0, 1 left lung, 2 right lung)."""
    return seg.astype(np.int64)


def _lung_regions(seg: np.ndarray) -> np.ndarray:
    """Evaluation target: (2, ...) masks of the left and the right lung."""
    return np.stack([seg == 1, seg == 2]).astype(np.uint8)


def _slice_augment() -> Any:
    """2D/2.5D lung slices: flips across the midline would swap the lungs' sides, so
    only a small rotation and zoom."""
    import albumentations as A

    return A.Compose(
        [A.Affine(scale=(0.9, 1.1), rotate=(-10, 10), border_mode=0, fill=0, fill_mask=0, p=0.5)]
    )


def _predict_lungs(scan: LunaScan, prep: LungPreprocessing) -> dict:
    """One scan (a lung mask beside it is not needed) as the lung cache holds it."""
    arrays, meta = preprocess_lungs(scan, prep, need_mask=False)
    return {
        "image": torch.from_numpy(arrays["image"].astype(np.float32)),
        "case_id": scan.seriesuid,
        "meta": meta,
    }
