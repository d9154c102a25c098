"""Datasets, laid out by dataset and by kind.

- ``io/``: what every dataset uses: ``volume`` (3D images with their geometry, NIfTI
  verification), ``images`` (JPEG/PNG decoding and verification), ``files`` (atomic
  writes, the demo-data marker), ``cache`` (the content-addressed cache of
  preprocessed cases);
- ``slices``, ``seeding``: 2.5D slice stacks and sphere boxes, reproducible augmentation;
- one package per dataset, each with ``source`` (the official layout: discovery, the
  checks of every file, preprocessing for the cache), ``torch`` (the torch datasets
  over its cached cases) and ``phantom`` (the seeded demo data, written in the official
  layout).

The data modules (``medlit.datamodules``) put these together; tasks import none of them
but ``slices``.
"""
