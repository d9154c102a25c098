"""Optuna sweeps over medlit experiments (``python -m medlit.sweep``).

``config``: the sweep file; ``space``: search space, samplers and pruners; ``storage``:
Optuna storages with dead-worker detection; ``trial``: the trial side, inside the
``medlit.fit`` process; ``worker``: the loop that runs trials and records them in MLflow.
"""
