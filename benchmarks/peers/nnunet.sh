#!/usr/bin/env bash
# nnU-Net v2, the reference of the 3D tests and benchmarks, in its own virtualenv
# (.venv-nnunet beside .venv): nnunetv2 needs dynamic-network-architectures, which pins
# timm<1.0.23, older than medlit's timm, so it cannot share medlit's environment. The
# environment gets the torch release medlit's .venv has (same kernels on both sides of a
# benchmark) when .venv exists, else the newest pip allows; then nnunetv2 with its own pins,
# and MONAI without its dependencies (it needs only torch and numpy, both here) at .venv's
# release: the 3D inference benchmark hands nnU-Net's predictor medlit's MONAI DynUNet.
# Usage: bash benchmarks/peers/nnunet.sh [python-for-the-venv]; prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-nnunet
NNUNET="nnunetv2==2.8.1"
# The release .venv has of a distribution, pinned; unpinned without .venv.
pinned() {
  if [ -x .venv/bin/python ]; then
    echo "$1==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1').split('+')[0])")"
  else
    echo "$1"
  fi
}
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import nnunetv2" 2>/dev/null; }; then
  rm -rf "$VENV"
  "${1:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet "$(pinned torch)" >&2
  "$VENV/bin/python" -m pip install --quiet "$NNUNET" >&2
fi
if ! "$VENV/bin/python" -c "import monai" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet --no-deps "$(pinned monai)" >&2
fi
echo "$VENV/bin/python"
