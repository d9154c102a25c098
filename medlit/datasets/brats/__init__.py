"""BraTS brain tumour MRI (2020, 2021, 2023-GLI layouts): ``source`` reads and checks the official layout, ``torch`` holds the torch
datasets over its cached cases, ``phantom`` writes the demo data."""
