"""nnU-Net v2 itself, the reference of the 3D and any-dataset tests: code run in its own
environment (``bash benchmarks/peers/nnunet.sh`` makes ``.venv-nnunet``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

PEER = Path(__file__).resolve().parents[2] / ".venv-nnunet" / "bin" / "python"


def nnunet(code: str) -> dict:
    """Run ``code`` in nnU-Net v2's own environment (one torch thread, no nnU-Net folders
    set); it prints one JSON object, returned. Without the environment the test is
    skipped, or fails where CI requires every service (``MEDLIT_REQUIRE_SERVICES``)."""
    if not PEER.exists():
        if os.environ.get("MEDLIT_REQUIRE_SERVICES"):
            pytest.fail(f"{PEER} is missing: bash benchmarks/peers/nnunet.sh makes it")
        pytest.skip("nnU-Net v2's environment is missing (bash benchmarks/peers/nnunet.sh)")
    done = subprocess.run(
        [str(PEER), "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_raw": "", "nnUNet_results": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
