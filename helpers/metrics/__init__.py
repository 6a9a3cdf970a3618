"""The other scores of a report: NLG metrics as R2Gen computes them, RadEval's clinical metrics and RadEval run
offline. Imports core."""
