"""ISIC dermoscopy (2018 Task 1 / Task 3, 2019, 2020): ``source`` reads and checks the official layout, ``torch`` holds the torch
datasets over its cached cases, ``phantom`` writes the demo data."""
