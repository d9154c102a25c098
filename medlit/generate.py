"""Write what a trained GANTask generates, in the official layouts.

    python -m medlit.generate CONFIG --ckpt_path CKPT --output DIR [--num_images N] [--seed S]
        [config overrides ...]

* unconditional (ISIC): N JPEGs ``ISIC_9xxxxxx.jpg`` in the release's image folder and,
  for a class-conditional model, the release's ground-truth CSV for them (one-hot, or
  ``train.csv`` for 2020), so they can be mixed into a classifier's training set;
* paired (BraTS): for every case of the data root, ``<case>/<case>_<target>-synth.nii.gz``:
  the synthesised target contrast (z-scored over the brain, as the model sees it), with the
  exact geometry of the source case.

The checkpoint is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medlit.cli import build
from medlit.datasets.isic import CLASSES, TRUTH_CSV
from medlit.datasets.synthetic import MARKER
from medlit.datasets.volume_io import Geometry, atomic_write, write_volume
from medlit.errors import ConfigError, run_main
from medlit.tasks.gan import GANTask

log = logging.getLogger("medlit")

IMAGE_DIRS = {
    "2018_task3": "ISIC2018_Task3_Training_Input",
    "2019": "ISIC_2019_Training_Input",
    "2020": "jpeg/train",
}


def write_isic_images(
    folder: Path, pixels: np.ndarray, labels: np.ndarray | None, year: str, first: int = 9000000
) -> list[str]:
    """Generated RGB images (N, H, W, 3) uint8 as an ISIC release of ``year``."""
    ids = [f"ISIC_{first + i:07d}" for i in range(len(pixels))]
    image_dir = folder / IMAGE_DIRS[year]
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id, image in zip(ids, pixels, strict=True):
        atomic_write(
            image_dir / f"{image_id}.jpg",
            lambda p, im=image: Image.fromarray(im).save(p, format="JPEG", quality=95),
        )
    if labels is not None:
        classes = CLASSES[year]
        if year == "2020":
            table = pd.DataFrame(
                {
                    "image_name": ids,
                    "patient_id": [f"IP_SYNTH{i:05d}" for i in range(len(ids))],
                    "target": labels.astype(int),
                }
            )
        else:
            table = pd.DataFrame(np.eye(len(classes))[labels], columns=list(classes))
            if year == "2019":
                table["UNK"] = 0.0
            table.insert(0, "image", ids)
        atomic_write(folder / TRUTH_CSV[year], lambda p: table.to_csv(p, index=False))
    return ids


def main(argv: list[str] | None = None) -> list[Path]:
    """Generate with the checkpoint's generator; returns the files written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m medlit.generate", add_help=False)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    experiment = build(rest, track=False)
    model, dm = experiment.model, experiment.datamodule
    if not isinstance(model, GANTask):
        raise ConfigError(f"medlit.generate needs a GANTask config, not {type(model).__name__}")
    ckpt = Path(ours.ckpt_path).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"--ckpt_path {ckpt} does not exist")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    model.eval()
    out = Path(ours.output)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if model.hparams["mode"] == "unconditional":
        year = dm._load().year  # the release the model was trained on names the layout
        if year not in IMAGE_DIRS:
            raise ConfigError(f"generated images need a classification release, not {year}")
        pixels, labels = model.generate_images(ours.num_images, ours.seed)
        ids = write_isic_images(out, pixels, labels, year)
        written = [out / IMAGE_DIRS[year] / f"{i}.jpg" for i in ids]
        (out / MARKER).write_text(
            json.dumps({"dataset": "isic-generated", "year": year, "checkpoint": str(ckpt)})
        )
    else:
        dm.prepare_data()
        dm.setup("predict")
        target = dm.modalities[-1]
        for item in dm.datasets["predict"]:
            volume = model.synthesise_volume(item["image"])[0].float().numpy()
            entry = next(
                e for e in dm.datasets["predict"].entries if e.meta["case_id"] == item["case_id"]
            )
            meta = entry.meta
            full = np.zeros(meta["shape"], np.float32)
            full[tuple(slice(a, b) for a, b in meta["bbox"])] = volume
            geometry = Geometry(
                *(tuple(meta["geometry"][k]) for k in ("origin", "spacing", "direction"))
            )
            path = out / item["case_id"] / f"{item['case_id']}_{target}-synth.nii.gz"
            write_volume(full, geometry, path)
            written.append(path)
    log.info("wrote %d files under %s", len(written), out)
    return written


if __name__ == "__main__":
    sys.exit(run_main(main))
