"""Notebook 04: GREEN per region with baselines and intervals, grounding, figures, the report and the Hub upload.
Imports core, model, judge, metrics, demo."""
