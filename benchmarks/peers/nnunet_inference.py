"""nnU-Net v2's side of ``benchmarks/inference3d.py``, run by ``.venv-nnunet``'s python
(``bash benchmarks/peers/nnunet.sh``): ``nnUNetPredictor.predict_sliding_window_return_logits``
over one case with a network that medlit's side saved (``torch.save`` of the module: a
MONAI DynUNet, which this environment has without its dependencies).

``python nnunet_inference.py THREADS``, then one JSON request per line on stdin:
``{"model": PATH, "volume": PATH (.npy, C×Z×Y×X), "classes": K, "patch": [z, y, x], "step": 0.5,
"mirror": true, "out": PATH or null}``; one JSON line back: ``{"seconds": ..., "passes":
...}`` (network calls of one window each), or ``{"error": ...}``. The process stays up
between requests, so imports and the first call's set-up are paid once, as a user's
predictor pays them once for a folder of cases.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch

# nnU-Net prints to stdout (on import, about its unset folders); replies get stdout alone.
REPLIES, sys.stdout = sys.stdout, sys.stderr
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402


def predictor(network: torch.nn.Module, classes: int, patch: list[int], step: float, mirror: bool):
    """The predictor as nnU-Net's docs set it up for speed (Gaussian, mirroring, everything
    on the device), with the three attributes ``predict_sliding_window_return_logits``
    reads set directly: ``manual_initialization`` needs a plans file and dataset.json for
    a network nnU-Net did not plan, and uses only these from them."""
    p = nnUNetPredictor(
        tile_step_size=step,
        use_gaussian=True,
        use_mirroring=mirror,
        perform_everything_on_device=False,  # what nnU-Net itself sets on a CPU
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    p.network = network
    p.configuration_manager = SimpleNamespace(patch_size=list(patch))
    p.allowed_mirroring_axes = (0, 1, 2)
    p.label_manager = SimpleNamespace(num_segmentation_heads=classes)
    return p


class Windows:
    """A forward pre-hook counting the windows the network sees."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _module: torch.nn.Module, args: tuple) -> None:
        self.count += int(args[0].shape[0])


def serve() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    networks: dict[str, torch.nn.Module] = {}
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req["model"] not in networks:
                networks[req["model"]] = torch.load(req["model"], weights_only=False).eval()
            net = networks[req["model"]]
            passes = Windows()
            hook = net.register_forward_pre_hook(passes)
            volume = torch.from_numpy(np.load(req["volume"]))
            p = predictor(net, req["classes"], req["patch"], req["step"], req["mirror"])
            start = time.perf_counter()
            logits = p.predict_sliding_window_return_logits(volume)
            # nnU-Net's region nonlinearity (label_manager.apply_inference_nonlin): sigmoid
            probabilities = torch.sigmoid(logits.float())
            seconds = time.perf_counter() - start
            hook.remove()
            if req.get("out"):
                np.save(req["out"], probabilities.numpy())
            reply = {"seconds": seconds, "passes": passes.count}
        except Exception:  # noqa: BLE001 - reported to the benchmark, which raises it
            reply = {"error": traceback.format_exc()}
        print(json.dumps(reply), file=REPLIES, flush=True)


if __name__ == "__main__":
    serve()
