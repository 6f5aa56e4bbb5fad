"""Measuring a model version: task metrics from predictions, plots, and the machine they were measured on.

Pure functions over arrays (no model, no serving): the evaluation job (``jobs/evaluate.py``) runs the version
through the serving path and hands its outputs here; training's held-out figures come from the same code."""
