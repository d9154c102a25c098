"""Predict with an exported network, without torch or Lightning.

What it needs is onnxruntime, NumPy, SciPy, SimpleITK, Pillow and OpenCV
(``pip install "medlit[deploy]"``).

    python -m medlit.deploy MODEL.onnx --input DIR_OR_FILE --output DIR
        [--threads N] [--batch_size N] [--postprocessing FILE] [--series CHANNEL=REGEX]

``MODEL.onnx`` is a network from ``medlit.export``; its metadata holds what a run needs,
the data module's reading and preprocessing settings included. What each runs, and what
``--input`` is (what ``medlit.predict`` takes for that dataset):

* **segmentation**, 2D/2.5D or 3D, of a volume dataset (BraTS, any nnU-Net / MSD
  dataset, LUNA16 lungs): a BraTS case folder or a folder of them; an image or a folder of
  ``<case>_<XXXX>`` channel files; ``.mhd`` scans. Written: the label map of each case on
  its input's exact grid, ``volumes.csv`` and the viewers' label descriptions.
* **classification** (ISIC): an image or a folder of ``.jpg``/``.jpeg``/``.png``
  images. Written: ``submission.csv`` in the release's official format.
* **detection** (LUNA16, the YOLO detector): a ``.mhd`` scan or a folder searched for
  them. Written: ``submission.csv`` (``seriesuid,coordX,coordY,coordZ,probability``,
  world mm).

Segmentation and detection also take a folder of DICOM series (``medlit[dicom]``);
segmentations of DICOM input are written as ``<case>_seg.dcm`` too. What is written is
what ``medlit.predict --model MODEL.onnx`` writes (the tests compare the two).

The steps are ``medlit.predict``'s, in NumPy: the same torch-free readers and
preprocessing as the data modules (:mod:`medlit.datasets`); segmentation slice by slice
or a Gaussian sliding window with the exported run's mirroring (:mod:`medlit.windows`),
the activation and threshold (or argmax), the probabilities resampled back to each case's
own grid and postprocessing (``--postprocessing``: a cross-validation's
``postprocessing.json``); detection's NMS and 3D merging (:mod:`medlit.detections`);
and the data modules' writers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medlit.datasets.io.dicom import (
    cases_from_series,
    find_series,
    is_dicom,
    override_rules,
    segment_codes,
    stage_cases,
    write_seg,
)
from medlit.datasets.io.files import atomic_write
from medlit.datasets.io.viewers import write_label_descriptions
from medlit.datasets.io.volume import write_uncropped
from medlit.detections import candidate_table, merge_detections, yolo_nms
from medlit.errors import ConfigError, Report, exit_process, run_main
from medlit.metrics.segmentation import structure_measures
from medlit.windows import linear_along, mirrored, slices, sliding_window, stacked

log = logging.getLogger("medlit")


@dataclass
class Case:
    case_id: str
    load: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]  # -> arrays, metadata


class Reader:
    """A data module's reading, preprocessing and writing, from its ``deploy_state``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def from_path(self, path: Path) -> list[Case]:
        raise NotImplementedError

    def from_files(self, cases: dict[str, list[Path]]) -> list[Case]:
        raise NotImplementedError

    def write(self, case_id: str, regions: np.ndarray, meta: dict, folder: Path) -> Path:
        raise NotImplementedError

    def label_names(self) -> dict[int, str]:
        """Value -> name of each label written (after the input has been read)."""
        return {int(v): n for v, n in self.state["label_names"].items()}


class BraTSReader(Reader):
    """BraTS cases (``medlit.datamodules.brats``): four contrasts, labels of the input's
    release (or of the training's, for DICOM input)."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__(state)
        from medlit.datasets.brats import source

        self.source = source
        self.modalities = tuple(state["modalities"])
        self.et = state["et_label"]

    def _cases(self, cases: list, layout: Any) -> list[Case]:
        spacing = self.state["target_spacing"]
        prep = self.source.Preprocessing(
            self.modalities, layout.labels, False, tuple(spacing) if spacing else None
        )
        self.et = self.state["et_label"] or layout.et_label
        return [Case(c.case_id, lambda c=c: self.source.preprocess_case(c, prep)) for c in cases]

    def from_path(self, path: Path) -> list[Case]:
        if not path.is_dir():
            raise ConfigError(f"--input {path}: BraTS input is a case folder or a folder of them")
        layout, cases = self.source.prediction_cases(path, self.state["year"], self.modalities)
        return self._cases(cases, layout)

    def from_files(self, cases: dict[str, list[Path]]) -> list[Case]:
        found = [
            self.source.BraTSCase(
                cid, files[0].parent, dict(zip(self.modalities, files, strict=True)), None
            )
            for cid, files in cases.items()
        ]
        return self._cases(found, self.source.LAYOUTS[self.state["default_year"]])

    def label_names(self) -> dict[int, str]:
        """Enhancing tumour under the value of the input's release (3 for 2023, else 4)."""
        names = super().label_names()
        return {(self.et if "(ET)" in n else v): n for v, n in names.items()}

    def write(self, case_id: str, regions: np.ndarray, meta: dict, folder: Path) -> Path:
        labels = self.source.labels_from_regions(regions, self.et).astype(np.uint8)
        return write_uncropped(labels, meta, folder / f"{case_id}.nii.gz")


class VolumesReader(Reader):
    """nnU-Net v2 raw / MSD datasets (``medlit.datamodules.volumes``), preprocessed with the
    training data's fingerprint as the export stored it."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__(state)
        from medlit.datasets.volumes import source

        self.source = source
        report = Report()
        raw = {**state["dataset_json"], "training": []}
        self.spec = source.parse_spec(raw, Path("model:dataset.json"), report)
        if self.spec is None:
            raise ConfigError(f"the model's dataset.json: {report.errors[0].problem}")
        p = state["preprocessing"]
        self.prep = source.Preprocessing(
            tuple(p["channels"]),
            tuple(p["allowed"]),
            tuple(p["spacing"]) if p["spacing"] else None,
            tuple(p["stats"]),
            p["norm_mask"],
            p["version"],
        )

    def _cases(self, cases: list) -> list[Case]:
        load = self.source.preprocess_case
        return [Case(c.case_id, lambda c=c: load(c, self.spec, self.prep)) for c in cases]

    def from_path(self, path: Path) -> list[Case]:
        return self._cases(self.source.prediction_cases(path, self.spec))

    def from_files(self, cases: dict[str, list[Path]]) -> list[Case]:
        return self._cases([self.source.VolumeCase(c, f, None) for c, f in cases.items()])

    def write(self, case_id: str, regions: np.ndarray, meta: dict, folder: Path) -> Path:
        labels = self.spec.labels.label_map(regions).astype(np.uint8)
        ending = self.spec.file_ending if self.spec.format == "nnunet" else ".nii.gz"
        return write_uncropped(labels, meta, folder / f"{case_id}{ending}")


class LungsReader(Reader):
    """LUNA16 lung segmentation (``medlit.datamodules.luna16``, ``target: lungs``): CT
    scans turned to the identity direction, resampled and HU-windowed; the lungs written
    as ``seg-lungs-LUNA16`` masks (3 left, 4 right) on each scan's own grid and axes."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__(state)
        from medlit.datasets.luna16 import source

        self.source = source
        spacing = state["spacing"]
        self.prep = source.LungPreprocessing(
            tuple(spacing) if spacing else None, tuple(state["hu_window"])
        )

    def _cases(self, scans: list) -> list[Case]:
        load = self.source.preprocess_lungs
        return [Case(s.seriesuid, lambda s=s: load(s, self.prep, need_mask=False)) for s in scans]

    def from_path(self, path: Path) -> list[Case]:
        return self._cases(self.source.prediction_scans(path))

    def from_files(self, cases: dict[str, list[Path]]) -> list[Case]:
        return self.from_path(_one_folder(cases))

    def write(self, case_id: str, regions: np.ndarray, meta: dict, folder: Path) -> Path:
        return self.source.write_lungs(regions, meta, folder / f"{case_id}.mhd")


def _one_folder(cases: dict[str, list[Path]]) -> Path:
    """The folder of scans converted from DICOM (one file each)."""
    folders = {files[0].parent for files in cases.values()}
    if len(folders) != 1:
        raise ConfigError("converted DICOM scans must lie in one folder")
    return folders.pop()


READERS: dict[str, type[Reader]] = {
    "brats": BraTSReader,
    "volumes": VolumesReader,
    "luna16_lungs": LungsReader,
}


class Model:
    """An exported network on onnxruntime, and what its metadata says."""

    KINDS = ("segmentation", "segmentation3d", "classification", "detection")

    def __init__(self, path: Path, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "medlit.deploy needs onnxruntime: pip install 'medlit[deploy]'"
            ) from None
        if not path.is_file():
            raise ConfigError(f"{path}: no such model file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map["medlit"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{path}: not a model exported by medlit.export ({e})") from None
        if meta.get("kind") not in self.KINDS:
            raise ConfigError(
                f"{path}: a {meta.get('kind')} network; medlit.deploy runs segmentation, "
                "classification and detection networks (medlit.generate runs generators)"
            )
        if not meta.get("deploy"):
            raise ConfigError(
                f"{path}: exported without the data module's deploy settings (its data "
                "cannot be read without medlit's data modules, such as ISIC lesion masks, "
                "or the export predates them); use medlit.predict --model"
            )
        if meta.get("fpr"):
            raise ConfigError(
                f"{path}: its candidates are re-ranked by a false-positive-reduction "
                "classifier (model.fpr_checkpoint), which is not in the file; predict with "
                "medlit.predict, or export the detector trained without it"
            )
        self.meta = meta

    def network(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(x, np.float32)})[0]

    def probabilities(self, image: np.ndarray, batch_size: int | None) -> np.ndarray:
        """(C, Z, Y, X) -> (K, Z, Y, X) probabilities, as the task's ``volume_probabilities``."""
        m = self.meta
        if m["kind"] == "segmentation":
            logits = slices(
                image,
                self.network,
                m["in_channels"],
                batch_size or m["inference_batch_size"],
                m["multiple"],
                m["min_size"],
            )
        else:
            net = self.network
            if m.get("mirror_axes"):
                net = mirrored(net, m["mirror_axes"])
            logits = sliding_window(
                image, net, m["patch_size"], m["overlap"], batch_size or m["sw_batch_size"]
            )
        if m["activation"] == "sigmoid":
            return 1 / (1 + np.exp(-logits))
        e = np.exp(logits - logits.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    def regions(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities -> boolean regions (R, Z, Y, X), as the task's ``to_regions``."""
        m = self.meta
        if m["target"] == "regions":
            return probs > m["threshold"]
        classes = probs.argmax(0)
        groups = m.get("class_to_region") or [[c] for c in range(1, m["num_classes"])]
        return np.stack([np.isin(classes, g) for g in groups])


def to_case_grid(probs: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Probabilities of a case cached at another spacing, back on its own cropped grid
    (the task's ``to_grid``: linear along each axis, each source voxel where the
    preprocessing's resampling took it from)."""
    shape = tuple(b - a for a, b in meta["bbox"])
    if probs.shape[1:] == shape:
        return probs
    native = list(reversed(meta["geometry"]["spacing"]))
    scale = [float(a) / float(b) for a, b in zip(native, meta["spacing_zyx"], strict=True)]
    for axis, (n, f) in enumerate(zip(shape, scale, strict=True), start=1):
        probs = linear_along(probs, axis, n, f)
    return probs


def predict_cases(
    model: Model,
    reader: Reader,
    cases: list[Case],
    out: Path,
    postprocessing: Any = None,
    batch_size: int | None = None,
) -> Iterator[tuple[str, Path, list[dict[str, Any]]]]:
    """Each case predicted and written: (case id, label file, its volumes row)."""
    names = model.meta["regions"]
    for case in cases:
        arrays, meta = case.load()
        probs = model.probabilities(arrays["image"].astype(np.float32), batch_size)
        regions = model.regions(to_case_grid(probs, meta))
        spacing = list(reversed(meta["geometry"]["spacing"]))
        if postprocessing is not None:
            regions = postprocessing.apply(regions, spacing)
        path = reader.write(case.case_id, regions, meta, out)
        row = {"case_id": case.case_id}
        if regions.shape[-3] > 1:
            row |= structure_measures(regions, names, spacing, "pred")
        log.info("%s -> %s", case.case_id, path.name)
        yield case.case_id, path, [row]


def classify(model: Model, source: Path, out: Path, batch_size: int) -> tuple[int, list[Path]]:
    """ISIC classification: each image's class probabilities in ``submission.csv``, the
    release's official format (``medlit.predict``'s ``SubmissionWriter``). Returns the
    number of images and the file."""
    from medlit.datasets.io.images import read_rgb
    from medlit.datasets.isic import source as isic

    state, classes = model.meta["deploy"], list(model.meta["classes"])
    # The release: the data module's at export, else the one with the model's classes
    # (medlit.predict's rule when neither data.year nor the training data name it).
    year = state["year"] or next(
        (y for y, c in isic.CLASSES.items() if len(c) == len(classes)), None
    )
    if year is None:
        raise ConfigError(f"no ISIC release has {len(classes)} classes, as the model has")
    images = isic.prediction_images(source)
    ids = list(images)
    probs = []
    for start in range(0, len(ids), batch_size):
        x = np.stack(
            [
                isic.model_input(read_rgb(images[i]), state["image_size"], state["normalize"])
                for i in ids[start : start + batch_size]
            ]
        )
        logits = model.network(x)
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(e / e.sum(1, keepdims=True))
    out.mkdir(parents=True, exist_ok=True)
    isic.write_submission(path := out / "submission.csv", ids, np.concatenate(probs), year)
    return len(ids), [path]


def detect_slices(
    model: Model, volume: np.ndarray, batch_size: int
) -> list[tuple[int, np.ndarray]]:
    """Boxes (n, 5) x1, y1, x2, y2, score of every axial slice of a windowed (Z, Y, X)
    volume (the task's ``detect_slices``): 2.5D stacks padded to the strides' multiple,
    the exported head's output through Ultralytics' NMS."""
    m = model.meta
    depth, height, width = volume.shape
    if min(height, width) < m["min_size"]:
        raise ConfigError(
            f"slices of {height} × {width} pixels; the exported detector takes "
            f"{m['min_size']} × {m['min_size']} and larger"
        )
    stride = max(m["strides"])
    pad = [(0, 0), (0, 0), (0, -height % stride), (0, -width % stride)]
    out = []
    for start in range(0, depth, batch_size):
        zs = np.arange(start, min(start + batch_size, depth))
        x = np.pad(stacked(volume[None], zs, m["context_slices"]), pad)
        kept = yolo_nms(model.network(x), m["conf_threshold"], m["iou_threshold"], m["max_det"])
        out += [(int(z), k[:, :5]) for z, k in zip(zs, kept, strict=True)]
    return out


def detect(model: Model, scans: list, out: Path, batch_size: int) -> list[Path]:
    """LUNA16 detection: each scan's slice boxes merged into 3D candidates, written in
    world mm as the challenge's ``submission.csv`` (the task's ``scan_candidates``; new
    scans have no cached lung mask, so ``lung_margin_mm`` keeps every candidate there
    too)."""
    from medlit.datasets.luna16 import source as luna

    m, state = model.meta, model.meta["deploy"]
    prep = luna.Preprocessing(tuple(state["spacing"]) if state["spacing"] else None)
    tables = []
    for scan in scans:
        arrays, meta = luna.preprocess_scan(scan, prep)
        volume = luna.window(arrays["image"], state["hu_window"])
        spacing = np.asarray(meta["geometry"]["spacing"], float)[::-1]
        found = detect_slices(model, volume, batch_size)
        merged = merge_detections(found, spacing, m["merge_tolerance"])
        merged = merged[: m["max_candidates"] * 2]
        table = candidate_table(
            scan.seriesuid, merged, merged[:, 4], meta["geometry"], m["max_candidates"]
        )
        tables.append(table.drop(columns="diameter_mm"))
        log.info("%s: %d candidates", scan.seriesuid, len(table))
    out.mkdir(parents=True, exist_ok=True)
    marks = pd.concat(tables, ignore_index=True)
    luna.write_submission(path := out / "submission.csv", marks)
    return [path]


def segment(
    model: Model, source: Path, out: Path, args: argparse.Namespace, staging: Path
) -> tuple[int, list[Path], list[Path]]:
    """Volume segmentation: each case's label map (and DICOM SEG, for DICOM input);
    returns the number of cases, the files and the tables written."""
    state = model.meta["deploy"]
    reader = READERS[state["reader"]](state)
    post = None
    if args.postprocessing:
        from medlit.postprocessing import Postprocessing

        post = Postprocessing.read(Path(args.postprocessing).expanduser())
    written: list[Path] = []
    rows: list[dict[str, Any]] = []
    dicom = None
    if is_dicom(source):
        rules = override_rules(state["dicom_rules"], args.series)
        dicom = cases_from_series(find_series(source), rules)
        cases = reader.from_files(stage_cases(dicom, staging, state.get("dicom_suffix", ".nii.gz")))
    else:
        cases = reader.from_path(source)
    names = reader.label_names()
    entries = {int(v): e for v, e in state["dicom_codes"].items()}
    known = {n: entries[int(v)] for v, n in state["label_names"].items() if int(v) in entries}
    codes = segment_codes(names, {}, {v: known.get(n, {}) for v, n in names.items()})
    out.mkdir(parents=True, exist_ok=True)
    for cid, path, row in predict_cases(model, reader, cases, out, post, args.batch_size):
        written.append(path)
        rows += row
        if dicom is not None:
            series = list(dicom[cid].values())
            written.append(
                write_seg(
                    _read(path),
                    series[0],
                    names,
                    codes,
                    out / f"{cid}_seg.dcm",
                    further=series[1:],
                    software=f"medlit {model.meta.get('medlit_version', 'unknown')}",
                )
            )
    tables = []
    if any(len(r) > 1 for r in rows):
        table = pd.DataFrame(rows).set_index("case_id").sort_index()  # as medlit.predict's
        atomic_write(path := out / "volumes.csv", lambda p: table.to_csv(p))
        tables.append(path)
    if names:
        tables += write_label_descriptions(out, names)
    return len(cases), written, tables


def main(argv: list[str] | None = None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m medlit.deploy", description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--postprocessing", default=None, metavar="FILE")
    parser.add_argument("--series", action="append", default=[], metavar="CHANNEL=REGEX")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: must be at least 1")
    model = Model(Path(args.model).expanduser(), args.threads)
    kind = model.meta["kind"]
    source, out = Path(args.input).expanduser(), Path(args.output).expanduser()
    if args.postprocessing and kind in ("classification", "detection"):
        raise ConfigError(f"--postprocessing: not for a {kind} network")
    if args.series and kind == "classification":
        raise ConfigError("--series: not for a classification network (no DICOM input)")
    tables: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="medlit-dicom-") as staging:
        if kind == "classification":
            if is_dicom(source):
                raise ConfigError(f"--input {source}: the classifier takes photographs, not DICOM")
            count, written = classify(model, source, out, args.batch_size or 32)
        elif kind == "detection":
            from medlit.datasets.luna16.source import prediction_scans

            if is_dicom(source):
                rules = override_rules(model.meta["deploy"]["dicom_rules"], args.series)
                cases = cases_from_series(find_series(source), rules)
                staged = stage_cases(cases, Path(staging), model.meta["deploy"]["dicom_suffix"])
                scans = prediction_scans(_one_folder(staged))
            else:
                scans = prediction_scans(source)
            written = detect(
                model, scans, out, args.batch_size or model.meta.get("inference_batch_size", 16)
            )
            count = len(scans)
        else:
            count, written, tables = segment(model, source, out, args, Path(staging))
    print(f"medlit.deploy: {count} inputs, wrote {len(written)} files to {out}")
    if tables:
        print(f"  and {', '.join(p.name for p in tables)}")
    return sorted(written)


def _read(path: Path) -> Any:
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


if __name__ == "__main__":
    exit_process(run_main(main))
