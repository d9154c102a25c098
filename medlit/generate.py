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
import logging
import sys
from pathlib import Path

import torch

from medlit.cli import build
from medlit.datamodules.base import BaseDataModule
from medlit.errors import ConfigError, exit_process, run_main
from medlit.overview import maybe_overview
from medlit.tasks.gan import GANTask

log = logging.getLogger("medlit")


def main(argv: list[str] | None = None) -> list[Path]:
    """Generate with the checkpoint's generator; returns the files written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m medlit.generate", add_help=False)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = list(sys.argv[1:] if argv is None else argv)
    if maybe_overview("medlit.generate", args):  # before --ckpt_path is required
        return []
    ours, rest = parser.parse_known_args(args)
    experiment = build(rest, track=False)
    model, dm = experiment.model, experiment.datamodule
    if not isinstance(dm, BaseDataModule):
        raise ConfigError("medlit.generate needs a medlit data module")
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
        # The data module's release (the one the model was trained on) names the layout.
        pixels, labels = model.generate_images(ours.num_images, ours.seed)
        written = dm.write_images(out, pixels, labels, provenance={"checkpoint": str(ckpt)})
    else:
        dm.prepare_data()
        dm.setup("predict")
        for item in dm.datasets["predict"]:
            volume = model.synthesise_volume(item["image"])[0].float().numpy()
            written.append(dm.write_synthesis(item["case_id"], volume, out))
    log.info("wrote %d files under %s", len(written), out)
    return written


if __name__ == "__main__":
    exit_process(run_main(main))
