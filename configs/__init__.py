"""Experiment configs (ml_collections). See `configs/defaults.py`."""
