"""Task 2's training: the dataset, presets and stages, TRL's trainers configured and fixed, the GREEN-rewarded
preference stage. Imports core, model, judge, metrics, demo."""
