"""Predict with a trained checkpoint on new data, written in the dataset's own formats.

    python -m medlit.predict CONFIG --ckpt_path PATH --input DIR_OR_FILE --output DIR
        [--batch_size N] [--device auto|cpu|cuda|cuda:K] [--num_workers N] [--no_progress]
        [config overrides ...]
    python -m medlit.predict CONFIG --cv_run RUN_ID --input ... --output ...   (an ensemble)

``--ckpt_path`` given several times, or ``--cv_run`` with a ``medlit.cv`` parent run
(every fold's checkpoint), predicts with their ensemble: the members' probabilities
averaged (:mod:`medlit.ensemble`; segmentation and classification). Segmentations are
postprocessed with what ``--cv_run``'s cross-validation chose on its out-of-fold cases
(``--postprocessing auto``, the default), ``none``, or a ``postprocessing.json``'s steps.

``--uncertainty`` (``entropy``, the default, or ``variance``) writes the predictive
uncertainty: segmentation, a per-voxel map beside each prediction
(``<case>_uncertainty.nii.gz``, ``.mhd`` for LUNA16, ``.tif`` for ISIC) and each case's
mean over the volume and over the predicted foreground in ``volumes.csv``;
classification, ``uncertainty.csv`` with one value per image. ``entropy`` is that of the
(ensemble's mean) probabilities, in nats (of independent regions, the sum of their binary
entropies); ``variance`` the ensemble members' variance of the probabilities.

``--model FILE.onnx`` (from ``medlit.export``) runs the same pipeline (slices or sliding
window, mirroring, postprocessing, writers) with the network executed by onnxruntime;
the file's metadata gives the data module's preprocessing state.

``--explain REGION`` (segmentation) writes the region's Seg-Grad-CAM (:mod:`medlit.explain`,
of the first model of an ensemble) beside each prediction as ``<case>_explain_<REGION>``
in the same format as the uncertainty map, on the input's grid, scaled to [0, 1].

What is written, by the experiment's task and data module:

* BraTS segmentation: ``<case>.nii.gz`` per case, in the input release's label values
  (1/2/4, or 1/2/3 for 2023), on the input's exact grid (shape, origin, spacing,
  direction). Input: a case folder, or a folder of case folders.
* ISIC classification: ``submission.csv`` in the release's official format. ISIC lesion
  segmentation: ``<id>_segmentation.png`` (0/255) at each image's own size. Input: an
  image, or a folder of ``.jpg``/``.jpeg``/``.png`` images.
* LUNA16 detection: ``submission.csv`` (``seriesuid,coordX,coordY,coordZ,probability``,
  world mm). Input: a ``.mhd`` scan, or a folder searched recursively for them.

CONFIG is the experiment the checkpoint was trained with (a run's logged ``config.yaml``
works too); its training data need not be present. The checkpoint is loaded with
``weights_only=True``. Every file is written to a temporary name and renamed, so an
interrupted run leaves only complete files. Inputs that do not fit the model (a missing
modality, a grey-scale image, a 4D scan) are refused before anything runs, naming the
file. Lightning runs the loop: ``--trainer.devices=N --trainer.strategy=ddp`` splits the
inputs between processes, ``--trainer.precision=bf16-mixed`` works as in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from medlit.cli import build, normalise_args
from medlit.datamodules.base import BaseDataModule
from medlit.datasets.io.dicom import (
    DicomSettings,
    Series,
    cases_from_series,
    find_series,
    is_dicom,
    override_rules,
    segment_codes,
    stage_cases,
    write_seg,
)
from medlit.ensemble import checkpoint_paths, load_members, set_postprocessing
from medlit.errors import ConfigError, exit_process, run_main
from medlit.export import use_exported
from medlit.overview import maybe_overview
from medlit.tasks.base import BaseTask
from medlit.tasks.segmentation import SegmentationTask

log = logging.getLogger("medlit")


def device_args(device: str) -> list[str]:
    """``--device`` as trainer overrides (later ``--trainer.*`` overrides still win)."""
    if device == "auto":
        return ["--trainer.accelerator=auto", "--trainer.devices=1"]
    if device == "cpu":
        return ["--trainer.accelerator=cpu", "--trainer.devices=1"]
    if device == "cuda":
        return ["--trainer.accelerator=gpu", "--trainer.devices=1"]
    if device.startswith("cuda:") and device[5:].isdigit():
        return ["--trainer.accelerator=gpu", f"--trainer.devices=[{int(device[5:])}]"]
    raise ConfigError(f"--device {device}: use auto, cpu, cuda or cuda:K")


def main(argv: list[str] | None = None) -> list[Path]:
    """Predict; returns the files written (on rank 0: all of them)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m medlit.predict", add_help=False)
    parser.add_argument("--ckpt_path", action="append")
    parser.add_argument("--cv_run", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--postprocessing", default="auto")
    parser.add_argument(
        "--uncertainty", nargs="?", const="entropy", default=None, choices=("entropy", "variance")
    )
    parser.add_argument("--explain", default=None, metavar="REGION")
    parser.add_argument("--series", action="append", default=[], metavar="CHANNEL=REGEX")
    args = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.predict", args):  # before --ckpt_path is required
        return []
    ours, rest = parser.parse_known_args(args)
    if not rest:
        raise ConfigError("give the experiment's CONFIG file first")
    exported = Path(ours.model).expanduser() if ours.model else None
    if exported is not None and (ours.ckpt_path or ours.cv_run):
        raise ConfigError("give --model FILE.onnx or --ckpt_path / --cv_run, not both")
    paths = checkpoint_paths(ours.ckpt_path, ours.cv_run, rest) if exported is None else []
    extra = [
        f"--trainer.enable_progress_bar={str(not ours.no_progress).lower()}",
        *device_args(ours.device),
    ]
    if ours.num_workers is not None:
        extra.append(f"--data.loader.num_workers={ours.num_workers}")
    # Nothing is tracked.
    experiment = build(rest, defaults=extra, track=False)
    model, dm, trainer = experiment.model, experiment.datamodule, experiment.trainer
    if not isinstance(model, BaseTask) or not isinstance(dm, BaseDataModule):
        raise ConfigError("medlit.predict needs a medlit task and data module")
    out = Path(ours.output).expanduser()
    writer = model.prediction_writer(out)  # refused here for a task that writes none
    if exported is None:
        load_members(model, dm, paths, normalise_args(rest)[1])
    else:
        use_exported(model, dm, exported)
    applied = set_postprocessing(model, ours.postprocessing, ours.cv_run, rest)
    if ours.uncertainty:
        if not type(model).ensembles:
            raise ConfigError(
                f"--uncertainty: {type(model).__name__} has no probabilities to take it from"
            )
        if ours.uncertainty == "variance" and len(paths) < 2:
            raise ConfigError(
                "--uncertainty variance is the ensemble members' disagreement: give several "
                "--ckpt_path or --cv_run (entropy works with one model)"
            )
        model.uncertainty = ours.uncertainty
    if ours.explain:
        if not isinstance(model, SegmentationTask):
            raise ConfigError("--explain: explanations are for segmentation tasks")
        model.explain_region = ours.explain  # refused here when the model has no such region
    if ours.batch_size is not None:
        if ours.batch_size < 1:
            raise ConfigError(f"--batch_size {ours.batch_size}: must be at least 1")
        dm.batch_size = ours.batch_size  # images per batch (ISIC)
        if "inference_batch_size" in model.hparams:  # slices per forward pass
            model.hparams["inference_batch_size"] = ours.batch_size
    source = Path(ours.input).expanduser()
    with tempfile.TemporaryDirectory(prefix="medlit-dicom-") as staging:
        if is_dicom(source):
            dicom = dicom_input(dm, source, ours.series, Path(staging))
        else:
            if ours.series:
                raise ConfigError(f"--series: {source} is not DICOM input")
            dm.predict_from(source, num_classes=model.hparams.get("num_classes"))
            dicom = None
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--output {out}: cannot create it ({e.strerror})") from None
        trainer.callbacks.append(writer)
        model.eval()
        trainer.predict(model, datamodule=dm, return_predictions=False)
    if dicom is not None:
        writer.written += write_dicom_segs(dm, dicom, getattr(writer, "by_case", {}))
    # What this run's writer wrote (every rank's count), not whatever else is in the folder.
    count = int(trainer.strategy.reduce(torch.tensor(len(writer.written)), reduce_op="sum"))
    if trainer.is_global_zero:
        print(f"medlit.predict: {len(dm.datasets['predict'])} inputs, wrote {count} files to {out}")
        if applied != "none":
            print(f"  postprocessed: {applied}")
        if writer.tables:
            print(f"  and {', '.join(p.name for p in writer.tables)}")
    return sorted(writer.written)


def dicom_input(
    dm: BaseDataModule, source: Path, series: list[str], staging: Path
) -> dict[str, Any]:
    """Read the DICOM input ``source`` (:mod:`medlit.datasets.io.dicom`): its series
    checked, mapped to the model's channels (the data module's rule, ``data.dicom.series``,
    then ``--series CHANNEL=REGEX``), converted into ``staging`` and given to the data
    module. Returns the cases' series and the DICOM SEG's segment codes, which are checked
    here, before anything runs."""
    rules = override_rules(dm.dicom_rules(), series)
    cases = cases_from_series(find_series(source), rules)
    dm.predict_from_images(stage_cases(cases, staging, dm.dicom_suffix), source)
    names = dm.label_names()
    settings = getattr(dm, "dicom_settings", DicomSettings())
    codes = segment_codes(names, settings.codes, dm.dicom_codes()) if names else {}
    log.info("DICOM %s: %d cases (%s)", source, len(cases), ", ".join(rules))
    return {"cases": cases, "names": names, "codes": codes}


def write_dicom_segs(
    dm: BaseDataModule, dicom: dict[str, Any], label_files: dict[str, Path]
) -> list[Path]:
    """Each segmentation predicted from DICOM as ``<case>_seg.dcm`` beside its label file:
    a DICOM SEG referencing the case's first channel's series (the others as further
    sources). Detection writes its CSV in world mm, which needs nothing more."""
    import SimpleITK as sitk

    from medlit.tracking.metadata import package_versions

    if not dicom["names"]:
        return []
    version = f"medlit {package_versions().get('medlit', 'unknown')}"
    written = []
    for cid, path in sorted(label_files.items()):
        channels: list[Series] = list(dicom["cases"][cid].values())
        written.append(
            write_seg(
                sitk.ReadImage(str(path)),
                channels[0],
                dicom["names"],
                dicom["codes"],
                path.parent / f"{cid}_seg.dcm",
                further=channels[1:],
                software=version,
            )
        )
    return written


if __name__ == "__main__":
    exit_process(run_main(main))
