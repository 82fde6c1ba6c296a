"""Measurement: batched greedy generation (with prefilling), judges, evaluation (HRR, prefill
ASR, task utility), loss correlation, loss and safety landscapes, plots.

May import: train/ (data, models, templates, summary), the shared modules (args, distributed,
precision, nll, progress).
"""
