"""medlit benchmarks: data pipeline, framework overhead, whole-volume inference, metrics and
LUNA16 preprocessing, side by side with MONAI, medpy, the official BraTS scorer and plain
PyTorch, on generated data in the official file formats.

    python -m benchmarks                # full run (~10 min on 2 CPU cores) -> docs/benchmarks.md
    python -m benchmarks --tiny --output /tmp/b.md      # smoke-test sizes (under a minute)
    python -m benchmarks --only quality   # every README demo unchanged -> docs/quality.md

MONAI, ITK (MONAI's MetaImage reader) and medpy are benchmark-only dependencies (the
``bench`` extra); medlit itself never imports them. Not part of the test suite:
``tests/test_benchmarks.py`` only checks that the suite runs on tiny sizes.
"""
