"""The notebooks' helpers: small modules, one concept each (ARCHITECTURE.md draws them).

Notebooks and tests import what they use one way: `from helpers import setup, data, runs, training, ...`. Modules are
not imported here: `peft` alone takes about 7 s to import and `green_score` about 7 s (measured on the CPU machine),
which notebook 01 with the rules backend should not pay; each module imports its own dependencies at its top.

Notebook-facing names, by notebook:
- every notebook: `setup(PROFILE, DATA_DIR, ARTIFACTS_DIR) -> settings.Settings` (profile from the GPU, paths,
  precision, 4-bit choices, batch sizes), `get_secret(name)`, `in_colab()` (all three re-exported here);
  `runs.Artifacts(settings.artifacts_dir)` (where every artifact lives), `.find_run(name)`, `.find_runs(names)`,
  `.run(name)`; `data.load_studies`, `data.by_split`, `data.readable_studies`, `data.read_annotation`,
  `storage.atomic_write_json`.
- 01: `regions.split_many`, `regions.split_regions` (re-exported here), `regions.annotation_with_regions`,
  `region_checks.agreement`, `regions.PROMPT_VERSION`.
- 02: `demo_models.build_random_llava`, `demo_models.tokenizer_corpus`, `modeling.DEFAULT_MODEL_ID`,
  `modeling.load_processor`, `modeling.training_chat_template`, `train_data.holdout_split`,
  `train_data.token_counts`, `train_data.describe`, `training.PRESETS`, `training.make_config`,
  `training.lora_config`, `training.method_table`, `training.train`, `plots.plot_losses`.
- 03: `modeling.load_for_inference`, `generation.generate_split`, `generation.load_predictions`,
  `generation.summarize`, `attention.analyze_study`, `plots.plot_confidence_histogram`, `plots.plot_shares`,
  `plots.plot_heatmaps`, `reports.INSTRUCTION`, `viewer.show_attention`.
- 04: `judge.Judge`, `judge.DEFAULT_JUDGE`, `demo_models.build_random_judge`, `baselines.template_regions`,
  `baselines.template_predictions`, `baselines.retrieval_neighbors`, `baselines.retrieval_predictions`,
  `green.evaluate`, `green.region_stats`, `green.green_tables`, `green.paired_differences`,
  `green.differences_in_words`, `green.write_outputs`, `green.markdown_table`, `green.confidence_vs_errors`,
  `green.PROTOCOL`, `metrics.nlg_table`, `metrics.meteor_unavailable_reason`, `plots.plot_region_scores`,
  `plots.plot_error_categories`, `plots.plot_score_distribution`, `plots.plot_confidence_vs_green`.
- also re-exported here: `pick_profile(gpu_memory_gb, compute_capability)`, `visual_tokens_per_view(width, height,
  mode)`, `nlg_metrics(references, hypotheses)`.
"""
import importlib

# Imported on first use, not here: the Colab setup cell imports `helpers.colab` before the pinned stack is installed,
# and importing torch or transformers then would pin their preinstalled versions until a restart.
_REEXPORTS = {"get_secret": "settings", "in_colab": "settings", "setup": "settings", "pick_profile": "settings",
              "visual_tokens_per_view": "modeling", "nlg_metrics": "metrics",
              "split_regions": "regions"}  # also what the Task-1 scorer (shared/tools/score_splitter.py) calls
__all__ = sorted(_REEXPORTS)


def __getattr__(name):
    if name not in _REEXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_REEXPORTS[name]}", __name__), name)
