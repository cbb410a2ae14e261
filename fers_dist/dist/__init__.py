"""Ray layer: cross-validation, tuning, resources and job submission (with data/prepare.py, the only code that imports ray)."""
