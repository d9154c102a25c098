"""Metrics that reproduce the official challenge scorers."""
