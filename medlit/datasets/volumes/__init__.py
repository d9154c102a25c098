"""Any volumetric segmentation dataset in the nnU-Net v2 raw or MSD format: ``source``
reads dataset.json, checks and preprocesses cases as nnU-Net does, ``phantom`` writes the
demo data (the torch datasets are BraTS's, which take any cached volume)."""
