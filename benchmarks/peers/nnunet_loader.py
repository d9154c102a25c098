"""nnU-Net v2's side of ``benchmarks/loader3d.py``, run by ``.venv-nnunet``'s python:
training batches from nnU-Net's own pipeline (``nnUNetTrainer.get_dataloaders``: its
``nnUNetDataLoader`` over the preprocessed dataset, its default training augmentation,
``NonDetMultiThreadedAugmenter`` with ``nnUNet_n_proc_DA`` processes), the plans' patch
and batch size set to the benchmark's, deep supervision off (its targets at every scale
are work medlit's loader does not do: medlit upsamples the network's heads instead).

``python nnunet_loader.py DATASET PATCH_Z,Y,X BATCH WORKERS BATCHES OUT.json``, with the
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` folders and
``nnUNet_n_proc_DA`` in the environment. Writes ``{"seconds": ..., "batches": ...,
"shape": [...]}``: the time of BATCHES batches after the pipeline is up and the batches
it had prefetched are taken (so that the time is the workers' steady rate).
"""

from __future__ import annotations

import json
import sys
import time

import torch

# nnU-Net prints to stdout; the result goes to a file.
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def main() -> None:
    dataset, patch, batch, workers, batches, out = sys.argv[1:7]
    torch.set_num_threads(1)
    folder = join(nnUNet_preprocessed, dataset)
    plans = load_json(join(folder, "nnUNetPlans.json"))
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = [int(p) for p in patch.split(",")]
    config["batch_size"] = int(batch)
    plans["continue_training"] = False  # what run_training sets for a new run
    trainer = nnUNetTrainer(
        plans, "3d_fullres", 0, load_json(join(folder, "dataset.json")), torch.device("cpu")
    )
    trainer.enable_deep_supervision = False
    trainer._set_batch_size_and_oversample()  # what initialize() does before training
    train, val = trainer.get_dataloaders()  # takes one batch of each
    val._finish()  # its processes would compete with the timed ones
    for _ in range(max(6, int(workers) // 2)):  # the augmenter's num_cached
        next(train)
    start = time.perf_counter()
    for _ in range(int(batches)):
        batch = next(train)
    seconds = time.perf_counter() - start
    train._finish()
    with open(out, "w") as f:
        json.dump(
            {"seconds": seconds, "batches": int(batches), "shape": list(batch["data"].shape)}, f
        )


if __name__ == "__main__":
    main()
