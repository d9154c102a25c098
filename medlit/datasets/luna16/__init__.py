"""LUNA16 lung CT (subsets, annotation and candidate CSVs, lung masks): ``source`` reads and checks the official layout, ``torch`` holds the torch
datasets over its cached cases, ``phantom`` writes the demo data."""
