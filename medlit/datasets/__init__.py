"""Datasets: readers of the official on-disk layouts, validation, caching and demo data."""
