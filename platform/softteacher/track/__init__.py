"""Experiment tracking: MLflow parent/child runs of a sweep and the fold result tables."""
