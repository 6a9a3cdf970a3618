"""The notebooks' helpers: ten packages stacked by pipeline stage (core, splitting, model, judge, metrics, demo, train,
evaluate, predict, preflight), small modules, one concept each (ARCHITECTURE.md draws them), and the commands on top.

Notebooks and tests import each module from its package: `from helpers.core import data`, `from helpers.train import
training`. Nothing is imported here: `peft` alone takes about 7 s to import and `green_score` about 7 s (measured on
the CPU machine), which notebook 01 with the rules backend should not pay; each module imports its own dependencies at
its top.

Notebook-facing names, by notebook (`python -m helpers STEP`, helpers/commands.py, calls the same ones):
- every notebook: `setup(PROFILE, DATA_DIR, ARTIFACTS_DIR) -> settings.Settings` (profile from the GPU, paths,
  precision, 4-bit choices, batch sizes), `get_secret(name)`, `in_colab()` (all three re-exported here);
  `smoke.Artifacts(settings.artifacts_dir, SMOKE)` (where every artifact lives, a `runs.Artifacts` that keeps smoke
  runs apart), `.find_run(name)`, `.find_runs(names)`, `.run(name)`; `data.load_studies`, `data.by_split`,
  `data.read_annotation`; with `SMOKE = True`: `smoke.run_name`, `smoke.write` and one projection function per step
  (`smoke.split_projection`, `smoke.training_projection`, `smoke.generation_projection`, `smoke.judge_projection`).
- 01: `regions.choose_backend`, `regions.val_reports`, `regions.split_many`, `regions.write_outputs`,
  `regions.split_regions` (re-exported here), `validation.agreement`.
- 02: `examples.training_studies`, `tiny_models.llava_id`, `training.default_run_name`, `modeling.load_processor`,
  `modeling.training_chat_template`, `examples.token_budget`, `training.PRESETS`, `training.make_config`,
  `training.lora_config`, `training.method_table`, `training.train`, `plots.plot_losses`.
- 03: `modeling.load_for_inference`, `generation.default_max_new_tokens`, `generation.studies_to_generate`,
  `generation.generate_splits`, `generation.load_predictions`, `generation.summarize`, `generation.summary_line`,
  `attention.chosen_studies`, `attention.analyze_studies`, `plots.plot_confidence_histogram`,
  `plots.plot_attention`, `viewer.show_attention`.
- 04: `evaluation.make_plan`, `evaluation.references`, `evaluation.run_predictions`, `evaluation.with_baselines`,
  `evaluation.make_judge`, `evaluation.judge_speed`, `evaluation.tables_in_words`, `baselines.template_regions`,
  `green.evaluate`, `green.region_stats`, `green.tables_by_system`, `green.paired_differences`,
  `green.differences_in_words`, `green.write_outputs`, `green.confidence_vs_errors`, `nlg.nlg_table`,
  `evaluation.clinical_metrics` (RadEval, `clinical.REXRANK_NOTE`), `smoke.splits`, `smoke.run_names`,
  `smoke.chain_summary`,
  `nlg.meteor_unavailable_reason`, `plots.plot_region_scores`, `plots.plot_error_categories`,
  `plots.plot_score_distribution`, `plots.plot_confidence_vs_green`.
- also re-exported here: `pick_profile(gpu_memory_gb, compute_capability)`, `visual_tokens_per_view(width, height,
  mode)`, `nlg_metrics(references, hypotheses)`.
"""
import importlib

# Imported on first use, not here: the Colab setup cell imports `helpers.core.colab` before the pinned stack is installed,
# and importing torch or transformers then would pin their preinstalled versions until a restart.
_REEXPORTS = {"get_secret": "core.settings", "in_colab": "core.settings", "setup": "core.settings",
              "pick_profile": "core.settings", "visual_tokens_per_view": "model.modeling", "nlg_metrics": "metrics.nlg",
              "split_regions": "splitting.regions"}  # also what the Task-1 scorer (shared/tools/score_splitter.py) calls
__all__ = sorted(_REEXPORTS)


def __getattr__(name):
    if name not in _REEXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_REEXPORTS[name]}", __name__), name)
