"""BaseDataModule: the contract between data modules and the tasks and entry points that
use them, and one loader factory for every split of every dataset.

Everything a task or an entry point may ask of a data module is declared on
:class:`BaseDataModule`, documented, with a default for a dataset that has nothing to
say. A task never imports a particular dataset, and nothing probes a data module with
``hasattr``/``getattr`` or dispatches on its class name: a data module overrides what its
dataset provides (``docs/adding-a-dataset.md`` lists the methods in the order they run).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd
import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from medlit.constraints import NonNegativeInt, PositiveInt
from medlit.datasets.io.cache import CacheEntry, VolumeCache
from medlit.datasets.io.files import atomic_write, is_synthetic
from medlit.datasets.io.volume import write_uncropped
from medlit.deprecation import moved
from medlit.errors import ConfigError, Report

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | None, kind: str, root: Path, ids: Iterable[str]) -> Path:
    """``<cache_dir or $MEDLIT_CACHE_DIR or ~/.cache/medlit>/<kind>-<hash of the ids>``.

    One namespace per dataset, named by what it holds (its case or image ids), not by
    where it is: case ids repeat across datasets, and a dataset moved, or mounted at
    another path on another node, finds its cache (its entries are content-addressed, and
    their source records hold file names, sizes and mtimes, not paths). A cache named by
    the root's resolved path, as before, is renamed to this name once, with a message."""
    base = Path(cache_dir or os.environ.get("MEDLIT_CACHE_DIR", "~/.cache/medlit")).expanduser()
    key = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:10]
    folder = base / f"{kind}-{key}"
    legacy = base / f"{kind}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]}"
    if legacy != folder and legacy.is_dir() and not folder.exists():
        try:
            os.rename(legacy, folder)
        except OSError:  # another process renamed it first
            pass
        else:
            log.info(
                "cache %s renamed %s: caches are named by the dataset's cases now, not by "
                "where it is mounted",
                legacy,
                folder.name,
            )
    return folder


def balanced_sampler(
    labels: Sequence[int], num_samples: int | None = None
) -> WeightedRandomSampler:
    """Draw items with probability inversely proportional to their class's frequency, so
    every class is drawn equally often (``num_samples`` per epoch, default all items)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels).clip(min=1)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=num_samples or len(labels), replacement=True)


def one_item_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate a batch of one whole case: tensors gain a batch axis, everything else
    (ids, metadata dicts) is wrapped in a list, untouched."""
    [item] = items
    return {k: v[None] if isinstance(v, torch.Tensor) else [v] for k, v in item.items()}


class ShareSampler(DistributedSampler):
    """Evaluation under DDP: rank k takes items k, k + N, k + 2N, ... (no shuffling, no
    padding), so the shares are disjoint and together are every item once.

    Written here because Lightning's default for evaluation (``DistributedSampler``) pads
    the last round with repeated items, and its ``UnrepeatedDistributedSampler`` refuses a
    rank with no item at all, which happens with fewer cases than ranks. Such a rank gets
    one repeated item instead, so that every rank runs the evaluation (and its epoch-end
    gathers); every gathered result is keyed by case id, so a repeat never counts twice.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)  # type: ignore[arg-type]
        share = list(range(rank, n, num_replicas))
        self.indices = share or ([rank % n] if n else [])
        self.num_samples = len(self.indices)
        self.total_size = n

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


@dataclass(frozen=True)
class Loader:
    """How the data loaders batch and read (every data module's ``loader:`` group).

    Args:
        batch_size: training items (slices, patches, images, candidates) per batch;
            evaluation takes one whole case per batch where cases are volumes.
        num_workers: data loader worker processes (0: load in the main process).
    """

    batch_size: PositiveInt = 16
    num_workers: NonNegativeInt = 2


class Scored(Protocol):
    """A challenge's score of a set of predictions (e.g. :class:`~medlit.metrics.froc.FROCResult`)."""

    def metrics(self) -> dict[str, float]:
        """Metric name -> value, logged under ``<stage>/``."""

    def plot(self, path: Path) -> None:
        """The score's figure (an FROC curve, ...) as an image file."""


class BaseDataModule(LightningDataModule):
    """Holds the loader settings; subclasses fill ``self.datasets[split]`` in ``setup``.

    Training batches are ``batch_size`` slices; evaluation batches are one whole case.

    The contract, by who asks (every member has a default here):

    - every entry point: :attr:`root`, :attr:`num_channels` (checked against the task's
      ``in_channels``), :attr:`is_synthetic` (the run's ``data`` tag), :meth:`check`
      (``medlit.check``) and ``prepare_data`` (a run): both run :meth:`run_pipeline`,
      which calls the dataset's :meth:`demo_data`, :meth:`discover`, :meth:`split`,
      :meth:`prepare_case` and :meth:`finish`, with a collecting or a strict report;
    - classification: :attr:`classes`, :attr:`class_counts`, :meth:`score_predictions`,
      :meth:`write_submission`;
    - segmentation: :meth:`segmentation_target`, :meth:`write_prediction`,
      :meth:`label_names`;
    - detection: :attr:`classes`, :meth:`reference`, :meth:`write_detections`,
      :meth:`candidate_inputs` and :meth:`search_mask` (false-positive reduction);
    - ``medlit.predict``: :meth:`predict_from`, then the task's writer calls the
      ``write_*`` method of its output.
    """

    # Renamed constructor arguments, new name -> old (medlit.deprecation).
    renamed_arguments: ClassVar[dict[str, str]] = {}
    # Arguments moved into a settings group, old name -> new key (medlit.deprecation).
    moved_arguments: ClassVar[dict[str, str]] = {
        "batch_size": "loader.batch_size",
        "num_workers": "loader.num_workers",
    }

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.loader = Loader()
        self.batch_size, self.num_workers = self.loader.batch_size, self.loader.num_workers
        self.datasets: dict[str, Dataset] = {}
        # Set by ``predict_from``: prediction reads this input, never ``root``.
        self.predict_input: Path | None = None
        # The pipeline's state: every case found (id -> record), the split, the cache
        # entries of the prepared cases, and whether a strict run has prepared them.
        self.cases_found: dict[str, Any] = {}
        self.split_ids: dict[str, list[str]] = {}
        self.entries: dict[str, CacheEntry] = {}
        self.prepared = False
        self._indexed = False

    def settings(self, legacy: dict[str, Any], **groups: Any) -> dict[str, Any]:
        """The constructor's settings groups (``loader``, ``split``: dataclasses), after
        ``save_hyperparameters``: a group given as a mapping (from Python) is converted,
        and arguments that moved into a group but were passed the old way (``**legacy``)
        are applied with a deprecation warning (:func:`medlit.deprecation.moved`).
        ``hparams`` then hold each group as a plain dict (no medlit class in a
        checkpoint) and none of the old names; ``loader`` is applied."""
        defaults = inspect.signature(type(self).__init__).parameters
        out = {
            name: type(defaults[name].default)(**value) if isinstance(value, dict) else value
            for name, value in groups.items()
        }
        out = moved(self, legacy, out)
        for old in legacy:
            self.hparams.pop(old, None)
        self.hparams.update({name: asdict(value) for name, value in out.items()})
        self.loader = out["loader"]
        self.batch_size, self.num_workers = self.loader.batch_size, self.loader.num_workers
        return out

    # ---- what the data are --------------------------------------------------------------

    @property
    def is_synthetic(self) -> bool:
        """Whether ``root`` holds medlit's demo data (the run is then tagged data=synthetic)."""
        return is_synthetic(self.root)

    @property
    def num_channels(self) -> int | None:
        """Channels of every ``image`` tensor the data module yields (the task's
        ``in_channels`` must equal it); None when it cannot be known from the config."""
        return None

    def segmentation_target(self) -> tuple[str, int, list[str]] | None:
        """What a segmentation task must predict for these labels: its ``target``
        (``regions`` or ``labels``), ``num_classes`` and the evaluated regions' names;
        None when the data module does not say (checked against the task at start)."""
        return None

    def label_names(self) -> dict[int, str]:
        """Value -> name of every non-zero label :meth:`write_prediction` writes (for the
        label descriptions viewers load); empty when it writes no label maps."""
        return {}

    def grid_spacing(self) -> tuple[float, float, float] | None:
        """(z, y, x) mm of the grid every cached case shares (a target spacing), which a 3D
        network is planned for; None when the cases keep their own or it is not known."""
        return None

    def cv_folds(self, num_folds: int | None) -> list[list[str]]:
        """Cross-validation (``medlit.cv``): for each fold, the overrides that make it the
        validation fold and the rest of the non-test cases its training set; the test
        split is the same in every fold. Default: ``data.split``'s ``num_folds`` and
        ``fold`` (k-fold over the groups the data module splits by, the test cases held
        out first); a split file fixes one split and is refused."""
        split = getattr(self, "split_settings", None)
        if split is None:
            raise ConfigError(f"{type(self).__name__} has no folds to cross-validate over")
        if split.split_file:
            raise ConfigError(
                f"data.split.split_file={split.split_file} fixes one split; cross-validation "
                "makes its folds from data.split.num_folds (and test_fraction): drop the file"
            )
        k = num_folds or split.num_folds
        if not k or k < 2:
            raise ConfigError(
                f"cross-validation needs --num_folds K (2 or more), got {k}; the config's "
                "data.split.num_folds is used when it is set"
            )
        return [[f"--data.split.num_folds={k}", f"--data.split.fold={f}"] for f in range(k)]

    def lesionwise(self) -> tuple[str, bool]:
        """The BraTS sub-challenge whose lesion-wise parameters (dilation, smallest lesion)
        score this dataset's lesions (:mod:`medlit.metrics.brats_lesionwise`), and whether
        segmentation computes those metrics without being asked (``metrics`` unset)."""
        return "BraTS-GLI", False

    def mirror_axes(self) -> tuple[int, ...]:
        """Spatial axes (0 = z) a volume may be flipped along without changing what its
        labels mean, for 3D mirroring augmentation and test-time mirroring: all three by
        default; a data module whose labels name a side (the left and the right lung)
        leaves out the left-right axis."""
        return (0, 1, 2)

    @property
    def classes(self) -> tuple[str, ...]:
        """Names of the classes of its ``label``/``box_labels`` targets, in index order;
        empty when its targets have no class names."""
        return ()

    @property
    def class_counts(self) -> list[int]:
        """Training items per class, in :attr:`classes` order (``class_weights:
        balanced``); empty when the targets are not classes."""
        return []

    # ---- prediction input ----------------------------------------------------------------

    def predict_from(self, path: Path, num_classes: int | None = None) -> None:
        """Make ``self.datasets["predict"]`` from the input at ``path`` (a file or folder in
        the dataset's own layout), never from ``root``: the training data need not be
        there. ``num_classes``: how many classes the model predicts, for a dataset whose
        output format depends on it (ISIC's releases). Bad input raises, naming the file."""
        raise ConfigError(f"{type(self).__name__} cannot read prediction inputs")

    # ---- DICOM input (medlit.predict --input DIR of DICOM series) --------------------------

    # The image format a DICOM series is converted to before predict_from_images reads it.
    dicom_suffix: ClassVar[str] = ".nii.gz"

    def dicom_rules(self) -> dict[str, str | None]:
        """The model's input channels, in order, each with the default regular expression
        its series' SeriesDescription must match (None: any series, for one channel);
        ``data.dicom.series`` overrides them (:mod:`medlit.datasets.io.dicom`)."""
        raise ConfigError(f"{type(self).__name__} does not read DICOM input")

    def dicom_codes(self) -> dict[int, dict[str, Any]]:
        """Label value -> ``{"category", "type"}`` codes of the DICOM SEG's segments for
        the labels this dataset knows (``data.dicom.codes`` overrides them)."""
        return {}

    def deploy_state(self) -> dict[str, Any] | None:
        """What ``medlit.deploy`` needs to read, preprocess and write cases as
        :meth:`predict_from` and :meth:`write_prediction` do, without this class (JSON:
        ``medlit.export`` stores it in the exported file): ``reader`` (which torch-free
        reader of :mod:`medlit.deploy`), its settings, the label names, the DICOM rules and
        segment codes. None: the data module cannot be deployed."""
        return None

    def deploy_common(self) -> dict[str, Any]:
        """The part of :meth:`deploy_state` every volume data module shares."""
        from medlit.datasets.io.dicom import DicomSettings, segment_entries

        names = self.label_names()
        table = getattr(self, "dicom_settings", DicomSettings()).codes
        entries = segment_entries(names, table, self.dicom_codes())
        return {
            "label_names": {str(v): n for v, n in names.items()},
            "dicom_rules": self.dicom_rules(),
            "dicom_suffix": self.dicom_suffix,
            "dicom_codes": {str(v): e for v, e in entries.items()},
        }

    def predict_from_images(self, cases: dict[str, list[Path]], source: Path) -> None:
        """As :meth:`predict_from`, for cases given as image files (case id -> one file of
        :attr:`dicom_suffix` per channel, in :meth:`dicom_rules`' order), converted from
        the DICOM input ``source``."""
        raise ConfigError(f"{type(self).__name__} does not read DICOM input")

    # ---- outputs, in the dataset's own formats -------------------------------------------

    def written_regions(self, regions: np.ndarray) -> np.ndarray:
        """Predicted (R, ...) regions as the dataset's label files can hold them (what
        :meth:`write_prediction` writes, read back): evaluation scores these, so that a
        run's metrics are the official scorer's on the written files. Default: as they
        are."""
        return regions

    def case_meta(self, case_id: str) -> dict[str, Any]:
        """The metadata of one of the data module's own cases (its geometry, crop, ...)."""
        for d in self.datasets.values():
            for e in getattr(d, "entries", ()):
                meta = getattr(e, "meta", None)
                if isinstance(meta, dict) and meta.get("case_id") == case_id:
                    return meta
        raise KeyError(case_id)

    def write_map(
        self,
        case_id: str,
        values: np.ndarray,
        folder: Path,
        meta: dict | None = None,
        name: str = "uncertainty",
    ) -> Path:
        """Write a per-voxel float map of one case (``values``: (Z, Y, X) on the grid of
        its segmentation, as :meth:`write_prediction` gets it) beside the segmentation,
        as ``<case>_<name>`` in the dataset's image format, on the input's exact grid.
        Default: for a case cropped from a volume (its metadata has ``shape``, ``bbox``
        and ``geometry``: BraTS, nnU-Net/MSD datasets), ``<case>_<name>.nii.gz`` (float32),
        uncropped."""
        meta = meta if meta is not None else self.case_meta(case_id)
        if not {"shape", "bbox", "geometry"} <= set(meta):
            raise ConfigError(f"{type(self).__name__} cannot write per-voxel maps")
        path = folder / f"{case_id}_{name}.nii.gz"
        return write_uncropped(values.astype(np.float32), meta, path)

    def write_prediction(
        self, case_id: str, regions: np.ndarray, folder: Path, meta: dict | None = None
    ) -> Path:
        """Write one case's segmentation (``regions``: (R, Z, Y, X) booleans, the task's
        regions) into ``folder`` as the dataset's label files are written, on the input's
        exact grid; returns the file. ``meta``: the case's metadata when it is not one of
        the data module's own cases (``medlit.predict``)."""
        raise ConfigError(
            f"{type(self).__name__} cannot write segmentations; unset model.predictions_dir"
        )

    def write_submission(
        self, path: Path, ids: list[str], probs: np.ndarray, class_names: Sequence[str]
    ) -> None:
        """Per-item class probabilities (``probs``: N × classes) as the challenge's
        submission file. Default: a CSV ``image,<class names>``."""
        table = pd.DataFrame(probs, columns=list(class_names))
        table.insert(0, "image", ids)
        atomic_write(Path(path), lambda p: table.to_csv(p, index=False))

    def score_predictions(self, ids: list[str], probs: np.ndarray) -> Scored | None:
        """The challenge's own score of per-item class probabilities, where it is not a
        per-item score (LUNA16 candidates: FROC/CPM over scans); None: the task's own
        metrics are the score."""
        return None

    # ---- generation (medlit.generate) ----------------------------------------------------

    def write_images(
        self,
        folder: Path,
        pixels: np.ndarray,
        labels: np.ndarray | None,
        provenance: dict[str, str] | None = None,
    ) -> list[Path]:
        """Generated images (N, H, W, 3) uint8, with their class indices or None, written
        into ``folder`` as a copy of the dataset's own layout (so that the data module can
        read it back); ``provenance`` is recorded beside them. Returns the image files."""
        raise ConfigError(f"{type(self).__name__} cannot write generated images")

    def write_synthesis(self, case_id: str, volume: np.ndarray, folder: Path) -> Path:
        """A synthesised image of one of the data module's cases (``volume``: its cropped
        (Z, Y, X) grid) written under ``folder`` on the case's exact geometry."""
        raise ConfigError(f"{type(self).__name__} cannot write synthesised volumes")

    # ---- detection -----------------------------------------------------------------------

    def reference(self, case_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The reference findings of ``case_ids`` to score detections against, and the
        findings that count neither as hits nor as false positives (LUNA16:
        ``annotations.csv`` and ``annotations_excluded.csv`` rows, official columns)."""
        raise ConfigError(f"{type(self).__name__} has no reference findings for detection")

    def write_detections(self, path: Path, marks: pd.DataFrame) -> None:
        """Scored detections (``marks``: one row per finding, world coordinates in mm) as
        the challenge's submission file. Default: the table as CSV."""
        atomic_write(Path(path), lambda p: marks.to_csv(p, index=False, float_format="%.6f"))

    def candidate_inputs(
        self, case_id: str, centres_zyx: np.ndarray, volume: np.ndarray | None = None
    ) -> np.ndarray:
        """Classifier inputs (N, C, S, S) at voxel positions ``centres_zyx`` of a case, made
        as its false-positive-reduction training patches are. ``volume``: the case's
        array when it is not one of the data module's own cases (``medlit.predict``)."""
        raise ConfigError(f"{type(self).__name__} has no candidate patches")

    def search_mask(self, case_id: str) -> np.ndarray | None:
        """Where findings may lie in a case (LUNA16: the lung mask, voxel grid of the
        cached scan); None: anywhere."""
        return None

    # ---- the data pipeline: demo data → discover → split → check → cache ------------------

    def demo_data(self) -> tuple[Callable[[Path], object], str] | None:
        """Step 1: what ``demo: true`` writes into an empty or missing ``root``: a writer of
        seeded data in the official layout (called with ``root``) and what it writes, in
        words; None: the dataset has no demo data."""
        return None

    def discover(self, report: Report) -> dict[str, Any]:
        """Step 2: the cases under ``root`` (case id -> the dataset's own case record),
        found from the official layout and index files; each problem to ``report`` (a
        missing ``root`` raises ``DatasetNotFoundError`` whatever the report)."""
        raise ConfigError(f"{type(self).__name__} has no data pipeline")

    def split(self, cases: dict[str, Any], report: Report) -> dict[str, list[str]]:
        """Step 3: the case ids of ``train``, ``val`` and ``test`` (a split file's
        problems to ``report``). Default: every case trains."""
        return {"train": sorted(cases), "val": [], "test": []}

    def prepare_case(self, case_id: str, case: Any, report: Report, deep: bool) -> bool:
        """Step 4, one case: check it and, for a run, cache it (most datasets call
        :meth:`check_and_cache`). Returns whether its files were read now (False: known
        good from an earlier run, by size and mtime)."""
        raise ConfigError(f"{type(self).__name__} has no data pipeline")

    def finish(self, report: Report) -> str:
        """Step 5, after every case: dataset-wide checks that need the prepared cases
        (LUNA16 places each CSV row in its scan). Returns a summary for the log line."""
        return ""

    def check(self, report: Report, deep: bool = False) -> int:
        """``medlit.check``: :meth:`run_pipeline` with a collecting report (every problem
        of every case listed). ``deep``: also re-verify each cached case against its
        source files. Returns the number of cases checked."""
        return self.run_pipeline(report, deep)

    def prepare_data(self) -> None:
        """A run (rank 0 of each node): :meth:`run_pipeline` with a strict report, so bad
        data stop the run here, before any training or tracking."""
        if self.predict_input is not None:  # predicting on other data: root unused
            return
        self.run_pipeline(Report(strict=True))

    def run_pipeline(self, report: Report, deep: bool = False) -> int:
        """The data pipeline, the same for a run and for ``medlit.check``: demo data,
        discover, split, then every case checked and cached, then the dataset-wide checks.

        The report decides the rest. Strict (a run): the first error raises; only the
        cases of the splits are prepared, each checked as it is cached, so a case cached
        before (sources unchanged) is not read again. Collecting (``medlit.check``):
        every case found is checked from its files, every problem is listed and nothing
        is cached. Returns the number of cases found.
        """
        if report.strict and self.prepared:
            return len(self.cases_found)
        start = time.perf_counter()
        self.index(report)
        used = {i for ids in self.split_ids.values() for i in ids}
        read = 0
        for case_id, case in self.cases_found.items():
            if report.strict and case_id not in used:
                continue
            read += self.prepare_case(case_id, case, report, deep)
        summary = self.finish(report)
        ready = len(used) if report.strict else len(self.cases_found)
        if report.strict:
            self.prepared = True
            log.info(
                "%s %s: %d cases ready in %.2f s (%d checked and preprocessed, %d from the "
                "cache%s)",
                type(self).__name__.removesuffix("DataModule"),
                self.root,
                ready,
                time.perf_counter() - start,
                read,
                ready - read,
                summary,
            )
        return len(self.cases_found)

    def index(self, report: Report | None = None) -> None:
        """Steps 1-3 once: demo data, :meth:`discover`, :meth:`split` (what ``setup`` needs
        on a rank that did not prepare the data)."""
        if self._indexed and report is None:
            return
        h = self.hparams
        if h.get("demo") and (demo := self.demo_data()) is not None:
            write, what = demo
            if not (self.root.exists() and any(self.root.iterdir())):
                start = time.perf_counter()
                write(self.root)
                log.info("wrote %s to %s in %.1f s", what, self.root, time.perf_counter() - start)
        report = report or Report()
        self.cases_found = self.discover(report)
        self.split_ids = self.split(self.cases_found, report)
        self._indexed = True

    def check_and_cache(
        self,
        cache: VolumeCache,
        case_id: str,
        sources: Sequence[Path],
        check: Callable[[Report], Any],
        build: Callable[[], tuple[dict[str, np.ndarray], dict]],
        report: Report,
        deep: bool = False,
    ) -> tuple[CacheEntry | None, Any]:
        """Step 4 for a case kept in a :class:`VolumeCache`: ``(entry, None)`` for a strict
        report (``build``, which checks the case, runs only when it is not cached yet);
        ``(None, check(report))`` for a collecting one, nothing cached, and with ``deep``
        the cached entry rebuilt and compared (one that differs is removed, so the next run
        rebuilds it). ``check`` returns None after an error."""
        if report.strict:
            entry = cache.get(case_id, sources, build)
            self.entries[case_id] = entry
            return entry, None
        checked = check(report)
        if checked is not None and deep:
            entry = cache.cached(case_id, sources)
            if problem := cache.verify(case_id, sources, build):
                report.error(
                    case_id,
                    entry or cache.directory,
                    f"cache entry: {problem}; removed, the next run rebuilds it",
                )
        return None, checked

    def volume_datasets(
        self,
        stage: str,
        entries: Callable[[str], list[CacheEntry]],
        train_target: Callable[[np.ndarray], np.ndarray],
        eval_target: Callable[[np.ndarray], np.ndarray] | None,
        slice_augment: Any = None,
        target_channels: int = 0,
        foreground_fraction: float | None = None,
    ) -> None:
        """The datasets of ``stage`` for a volumetric segmentation data module whose cases
        are cache entries in :func:`medlit.datasets.patches.cached_case`'s layout:
        training draws 3D patch batches (``self.patch_3d`` set) or 2D/2.5D slices, with
        ``train_target`` and the data module's ``patch_size``, ``context_slices``,
        ``foreground_fraction``, ``samples_per_epoch``, ``augment`` (and ``elastic`` for
        3D; ``slice_augment``, an albumentations pipeline, for slices); validation, test
        and prediction take whole cases, scored with ``eval_target``. ``entries(split)``
        gives the entries of ``train``, ``val``, ``test`` or ``predict``.
        ``target_channels``: the last channels are targets (modality synthesis);
        ``foreground_fraction`` overrides the hyperparameter of that name."""
        from medlit.datasets.brats.torch import CaseDataset, SliceDataset
        from medlit.datasets.patches import Augment3D, PatchBatches

        h = self.hparams
        patch_3d = getattr(self, "patch_3d", None)
        if foreground_fraction is None:
            foreground_fraction = h["foreground_fraction"]
        if stage == "fit" and patch_3d:
            self.datasets["train"] = PatchBatches(
                entries("train"),
                train_target,
                patch_3d,
                self.batch_size,
                foreground_fraction,
                length=max(h["samples_per_epoch"] // self.batch_size, 1),
                augment=Augment3D(
                    elastic=h.get("elastic", False), mirror_axes=self.mirror_axes()
                ).build()
                if h["augment"]
                else None,
            )
        elif stage == "fit":
            self.datasets["train"] = SliceDataset(
                entries("train"),
                train_target,
                patch_size=h["patch_size"],
                context=h["context_slices"],
                foreground_fraction=foreground_fraction,
                length=h["samples_per_epoch"],
                augment=slice_augment if h["augment"] else None,
                target_channels=target_channels,
            )
        splits = {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in splits:
            self.datasets[split] = CaseDataset(entries(split), eval_target, target_channels)
        if stage == "predict":
            self.datasets["predict"] = CaseDataset(entries("predict"), None, target_channels)

    def _loader(
        self, split: str, shuffle: bool = False, batch_size: int | None = None, **kwargs: Any
    ) -> DataLoader:
        """Training: ``batch_size`` items, last partial batch dropped; evaluation: one whole
        case per batch unless ``batch_size`` says otherwise."""
        train = split == "train"
        if not train and "sampler" not in kwargs and (sampler := self._eval_sampler(split)):
            kwargs["sampler"] = sampler
        dataset = self.datasets[split]
        if getattr(dataset, "yields_batches", False):  # each item is a whole batch
            return DataLoader(
                dataset,
                batch_size=None,
                shuffle=shuffle,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=train and torch.cuda.is_available(),
                **kwargs,
            )
        return DataLoader(
            dataset,
            batch_size=batch_size or (self.batch_size if train else 1),
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=train and torch.cuda.is_available(),
            drop_last=train,
            **kwargs,
        )

    def _eval_sampler(self, split: str) -> DistributedSampler | None:
        """Under DDP, each rank evaluates a disjoint share of the cases, and the shares
        together are every case exactly once (see :class:`ShareSampler`)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return ShareSampler(self.datasets[split], trainer.world_size, trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
