"""The four notebooks as commands, for a lab machine with one GPU or several:

    python -m helpers split    | train | generate | evaluate  [--profile ...] [--run-name ...] ...
    python -m helpers predict --run-name RUN IMAGE [IMAGE ...]     (your own X-ray: 1 to 4 views, PNG/JPEG/DICOM)
    python -m helpers push --run-name RUN --repo-id USER/NAME [--dry-run]
    torchrun --nproc_per_node N -m helpers train | generate | evaluate ...
    accelerate launch --num_processes N -m helpers train | generate | evaluate ...

Each step's options are its notebook's parameters cell (names, defaults and comments are read from the notebook, so
the two cannot drift apart), and each step calls the functions the notebook's cells call, writing the same artifacts
to the same places. Under several processes `train` is the Trainer's DDP, and `generate` / `evaluate` spread their
batches over the processes (`storage.run_sharded`); the main process alone prints and writes the reports and figures.
A True / False option may be given alone: `--smoke` is `--smoke True`, the step's smoke run (helpers/preflight/smoke.py).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import papermill

from .core.errors import UserError
from .core.settings import get_secret, processes, setup
from .preflight.smoke import Artifacts

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = {"split": "01_region_prompting.ipynb", "train": "02_sft_lora_qlora.ipynb",
             "generate": "03_generate.ipynb", "evaluate": "04_green_eval.ipynb"}
SHOWN_ONLY = {"N_EXAMPLES", "PREDICT_IMAGES"}  # notebook parameters that only choose what a notebook displays
LISTS = {"RUN_NAMES", "ATTENTION_IDS", "ATTENTION_LAYERS"}  # given as several values: --run-names a b
TEXT_SUFFIXES = ("_DIR", "_ID", "_IDS", "_NAME", "_NAMES", "_RUN", "_MODEL", "PROFILE", "BACKEND", "PRESET", "VISUAL_TOKENS")


def parameter_value(text: str):
    """A Python literal (numbers, True, None, lists) when it parses as one, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _option_value(name: str):
    """How one option's text becomes the notebook parameter's value: names and paths stay text ("None" aside)."""
    if name.endswith(TEXT_SUFFIXES):
        return lambda text: None if text == "None" else text
    return parameter_value


def notebook_parameters(step: str) -> dict[str, dict]:
    """The parameters cell of the step's notebook: {NAME: {"default": value, "help": its comment}}."""
    found = papermill.inspect_notebook(str(NOTEBOOKS_DIR / NOTEBOOKS[step]))
    return {name: {"default": parameter_value(p["default"]), "help": p["help"]} for name, p in found.items()
            if name not in SHOWN_ONLY}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for step, notebook in NOTEBOOKS.items():
        sub = steps.add_parser(step, help=f"notebooks/{notebook}", description=(
            f"notebooks/{notebook} as a command: each option is the notebook parameter of the same name. Outside "
            f"Colab a DATA_DIR / ARTIFACTS_DIR of None is data/ / artifacts/ of the repository (data/sample, "
            f"artifacts/demo with --profile demo)."))
        for name, p in notebook_parameters(step).items():
            switch = isinstance(p["default"], bool)  # --smoke alone is --smoke True
            sub.add_argument(f"--{name.lower().replace('_', '-')}", dest=name, default=p["default"],
                             type=_option_value(name), nargs="+" if name in LISTS else "?" if switch else None,
                             const=True if switch else None,
                             help=f"{p['help']} (default: {p['default']!r})".replace("%", "%%"))
    predict = steps.add_parser("predict", help="your own X-ray: a run's four-region report, attention overlays",
                               description="A trained run's report for 1 to 4 views of one study (8- or 16-bit PNG, "
                                           "JPEG, DICOM), and an attention overlay per view (helpers/predict/inference.py).")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="1 to 4 views of one study")
    predict.add_argument("--load-in-4bit", dest="LOAD_IN_4BIT", type=parameter_value, default=None,
                         help="None: as the run was trained, or 4-bit on a GPU under 24 GiB (default: None)")
    predict.add_argument("--out-dir", dest="OUT_DIR", default=None,
                         help="where the overlay PNGs go (default: ARTIFACTS_DIR/generate/<run>/predict)")
    push = steps.add_parser("push", help="upload a run's adapter, processor, config and model card to the Hub",
                            description="Upload train/<run>/hub/ (adapter, processor, config.json, model card with "
                                        "notebook 04's tables) with HF_TOKEN (helpers/evaluate/hub.py).")
    push.add_argument("--repo-id", dest="REPO_ID", required=True, help="USER/NAME of the model repository")
    push.add_argument("--dry-run", dest="DRY_RUN", action="store_true",
                      help="write train/<run>/hub/ and stop, uploading nothing")
    push.add_argument("--private", dest="PRIVATE", action="store_true", help="create the repository private")
    for sub in (predict, push):
        sub.add_argument("--run-name", dest="RUN_NAME", required=True, help="the notebook-02 run")
        sub.add_argument("--profile", dest="PROFILE", default=None, help="as in the notebooks; demo: artifacts/demo")
        sub.add_argument("--artifacts-dir", dest="ARTIFACTS_DIR", default=None,
                         help="None: Drive in Colab, artifacts/ here (artifacts/demo with --profile demo)")
        sub.set_defaults(DATA_DIR=None, SMOKE=False)  # setup() resolves the data folder; neither step reads it
    return parser


def split(p, settings, artifacts) -> None:
    """Notebook 01: split the val reports into regions."""
    from .core import data
    from .splitting import regions
    from .preflight import smoke

    if processes().num_processes > 1:
        raise SystemExit("split runs in one process (an API or one local LLM): python -m helpers split ...")
    backend, options = regions.choose_backend(settings, p.BACKEND, p.OPENAI_MODEL, p.HF_MODEL)
    annotation = data.read_annotation(settings.data_dir / "annotation.json")
    all_val_reports = regions.val_reports(annotation)
    start = time.time()
    split_run = regions.split_many(smoke.val_reports(all_val_reports) if p.SMOKE else all_val_reports,
                                   backend=backend, cache_path=artifacts.regions_dir / "cache.jsonl", **options)
    seconds = time.time() - start
    print(split_run.summary())
    for study_id, why in sorted(split_run.failures.items()):
        print(f"failed {study_id}: {why}")
    for path in regions.write_outputs(artifacts, annotation, split_run):
        print("wrote", path)
    if p.SMOKE:
        print(smoke.write(artifacts.regions_dir / "projection.json",
                          smoke.split_projection(settings, split_run, seconds, len(all_val_reports))))


def train(p, settings, artifacts) -> None:
    """Notebook 02: fine-tune, stage by stage (DDP under torchrun / accelerate launch)."""
    from .model import modeling
    from .demo import tiny_models
    from .train import examples, training
    from .evaluate import plots
    from .preflight import cost, smoke

    fit, held = examples.training_studies(settings.data_dir, p.MAX_VIEWS, p.HOLDOUT_FRACTION)
    model_id = cost.free_t4_model(p.MODEL_ID, p.FREE_T4, settings)  # FREE_T4: the 0.5B
    model_id = tiny_models.llava_id(settings, artifacts, fit + held, model_id)
    visual_tokens = p.VISUAL_TOKENS or settings.visual_tokens
    run = artifacts.run(smoke.run_name(p.RUN_NAME or training.default_run_name(model_id, p.PRESET), p.SMOKE))
    processor = modeling.load_processor(model_id, visual_tokens=visual_tokens, token=get_secret("HF_TOKEN"))
    processor.chat_template = modeling.training_chat_template(processor)
    budget = examples.token_budget(fit + held, processor, p.MAX_VIEWS)
    smoke_config = {}
    if p.SMOKE:
        smoke_config = smoke.training_config(fit, held, training.resolve_stages(p.PRESET, p.EPOCHS or settings.epochs,
                                                                                settings.lr_scale))
        fit, held = smoke.training_studies(fit + held, p.HOLDOUT_FRACTION)
    preference, judge = training.preference_inputs(settings, artifacts, p.PRESET, candidates=p.DPO_CANDIDATES,
                                                   studies=p.DPO_STUDIES, beta=p.DPO_BETA,
                                                   judge_model_id=p.JUDGE_MODEL_ID, judge_engine=p.JUDGE_ENGINE,
                                                   judge_url=p.JUDGE_URL)
    config = training.make_config(settings, model_id=model_id, preset=p.PRESET, epochs=p.EPOCHS,
                                  max_views=p.MAX_VIEWS, visual_tokens=visual_tokens, load_in_4bit=p.LOAD_IN_4BIT,
                                  lora_r=p.LORA_R, lora_alpha=2 * p.LORA_R, preference=preference, **budget,
                                  **smoke_config)
    metrics = training.train(run, config, fit, held, judge=judge)
    if processes().is_main_process:
        plots.plot_losses(metrics, run.train_dir / "loss.png")
        print(f"run {run.name}: adapter in {run.adapter_dir}, metrics in {run.metrics_path}")
        if p.SMOKE:
            print(smoke.write(run.train_dir / "projection.json",
                              smoke.training_projection(settings, metrics, run.config)))


def generate(p, settings, artifacts) -> None:
    """Notebook 03: reports for val and test (batches spread over the processes), the grounding check's reports, then
    confidence and attention."""
    from .model import attention, generation, modeling
    from .evaluate import grounding, plots
    from .preflight import smoke

    run = artifacts.find_run(smoke.run_name(p.RUN_NAME, p.SMOKE))
    model, processor, run_config = modeling.load_for_inference(
        run, p.LOAD_IN_4BIT, small_gpu=settings.for_model_id(run.config["model_id"]).inference_4bit)  # by its size
    max_views = run_config["max_views"]
    max_new_tokens = p.MAX_NEW_TOKENS or generation.default_max_new_tokens(run_config)
    all_splits, references = generation.studies_to_generate(settings.data_dir, artifacts, max_views)
    splits = smoke.splits(all_splits) if p.SMOKE else all_splits
    speed = generation.generate_splits(model, processor, splits, run, max_views=max_views,
                                       batch_size=p.BATCH_SIZE or settings.generate_batch_size,
                                       max_new_tokens=max_new_tokens, num_beams=p.NUM_BEAMS,
                                       repetition_penalty=p.REPETITION_PENALTY)
    grounding_speed = grounding.generate_ablations(
        model, processor, splits["test"][:0 if p.FREE_T4 else p.GROUNDING_STUDIES], run, max_views=max_views,
        batch_size=p.BATCH_SIZE or settings.generate_batch_size, max_new_tokens=max_new_tokens,
        num_beams=p.NUM_BEAMS, repetition_penalty=p.REPETITION_PENALTY)
    if not processes().is_main_process:
        return
    for ablation, figures in grounding_speed.items():
        print(ablation, figures)
    records = {split: list(generation.load_predictions(run.predictions(split)).values()) for split in splits}
    for split, figures in speed.items():
        print(figures)
        print(generation.summary_line(split, generation.summarize(records[split], references,
                                                                  max_new_tokens=max_new_tokens)))
    plots.plot_confidence_histogram(records["val"] + records["test"], run.attention_dir / "confidence.png")
    chosen = attention.chosen_studies(splits, p.ATTENTION_IDS, smoke.attention_studies(p.ATTENTION_STUDIES, p.SMOKE))
    analyses = attention.analyze_studies(model, processor, chosen, max_views=max_views, max_new_tokens=max_new_tokens,
                                         layers=p.ATTENTION_LAYERS)
    plots.plot_attention(analyses, run.attention_dir, p.ATTENTION_LAYERS)
    print(f"wrote {run.generate_dir}: predictions_val.jsonl, predictions_test.jsonl, attention/")
    if p.SMOKE:
        print(smoke.write(run.generate_dir / "projection.json",
                          smoke.generation_projection(settings, speed, all_splits)))


def evaluate(p, settings, artifacts) -> None:
    """Notebook 04: GREEN per region for the runs and baselines (judge batches spread over the processes), NLG and
    RadEval's clinical metrics, the grounding check, then eval/compare/report.md."""
    from .core import data
    from .metrics import nlg
    from .evaluate import evaluation, green, grounding, report
    from .preflight import smoke

    studies = data.load_studies(settings.data_dir, require_images=("train", "val", "test"))
    plan = evaluation.make_plan(settings, artifacts, studies, run_names=smoke.run_names(p.RUN_NAMES, p.SMOKE),
                                reference_run=smoke.run_name(p.REFERENCE_RUN, p.SMOKE),
                                judge_model_id=p.JUDGE_MODEL_ID, judge_4bit=p.JUDGE_4BIT,
                                judge_batch_size=p.JUDGE_BATCH_SIZE, judge_max_new_tokens=p.JUDGE_MAX_NEW_TOKENS,
                                judge_engine=p.JUDGE_ENGINE, judge_url=p.JUDGE_URL,
                                base_model_id=p.BASE_MODEL_ID, max_views=p.MAX_VIEWS, retrieval=not p.FREE_T4)
    print(plan)
    all_refs = evaluation.references(settings, artifacts, studies)
    refs = smoke.splits(all_refs) if p.SMOKE else all_refs
    predictions = evaluation.run_predictions(artifacts, plan.runs, refs)
    systems = predictions if p.SMOKE else evaluation.with_baselines(predictions, data.by_split(studies, "train"), refs,
                                                                    artifacts, plan)
    judge = evaluation.make_judge(artifacts, plan)
    frame = green.evaluate(systems, refs, judge)
    grounding_table = grounding.evaluate(artifacts, plan.runs, refs["test"], judge, p.N_BOOT, p.SEED)
    if not processes().is_main_process:
        return
    print(evaluation.judge_speed(judge))
    print(grounding.in_words(grounding_table))
    for path in grounding.write_outputs(grounding_table, artifacts):
        print("wrote", path)
    stats = green.region_stats(frame)
    tables = green.tables_by_system(frame, stats, p.N_BOOT, p.SEED)
    print(evaluation.tables_in_words(tables, stats, plan, judge))
    diff = green.paired_differences(frame, plan.runs, plan.reference_run, p.N_BOOT, p.SEED)
    print(green.differences_in_words(diff))
    nlg_scores = nlg.nlg_table(systems, refs, meteor=p.METEOR)
    if nlg_scores.METEOR.isna().all():
        print("METEOR:", nlg.meteor_unavailable_reason() or "switched off (--meteor False)")
    for path in green.write_outputs(frame, stats, tables, diff, nlg_scores, artifacts, plan.runs):
        print("wrote", path)
    for path in evaluation.write_figures(frame, tables, artifacts, plan.runs):
        print("wrote", path)
    clinical_inputs = ()
    if p.CLINICAL and not p.FREE_T4:
        from .metrics.clinical import REXRANK_NOTE

        clinical_table, _, leaderboard, clinical_scores, paths = evaluation.clinical_metrics(
            settings, artifacts, studies, systems, refs, plan, judge, nlg_scores, tables, p.N_BOOT, p.SEED)
        clinical_inputs = clinical_table, clinical_scores
        print("\n".join(f"wrote {path}" for path in paths))
        print(REXRANK_NOTE, leaderboard.round(3), sep="\n")
    lengths = evaluation.report_lengths(systems)
    print(lengths.round(1))
    counterparts = evaluation.sft_counterparts(artifacts, plan.runs)
    comparison = evaluation.preference_comparison(counterparts, frame, stats, nlg_scores, lengths, *clinical_inputs,
                                                  n_boot=p.N_BOOT, seed=p.SEED)
    print(evaluation.preference_in_words(comparison, counterparts))
    for path in evaluation.write_preference_outputs(comparison, lengths, artifacts):
        print("wrote", path)
    print("wrote", report.write(artifacts, demo=settings.profile == "demo"))
    if p.SMOKE:
        projection = smoke.judge_projection(settings, judge, frame, len(plan.runs), all_refs)
        for name in plan.runs:
            print(smoke.write(artifacts.run(name).eval_dir / "projection.json", projection))
            print(smoke.chain_summary(artifacts, artifacts.run(name)))


def predict(p, settings, artifacts) -> None:
    """Your own X-ray: the report of 1 to 4 views and an attention overlay per view."""
    from .predict.inference import Predictor, check_views, in_words

    check_views(p.images)  # before the model loads
    run = artifacts.find_run(p.RUN_NAME)
    small_gpu = settings.for_model_id(run.config["model_id"]).inference_4bit  # 4-bit by the model's size
    predictor = Predictor.load(run, p.LOAD_IN_4BIT, small_gpu=small_gpu)
    print(in_words(predictor(p.images, p.OUT_DIR)))


def push(p, settings, artifacts) -> None:
    """A run's adapter, processor, config and model card to the Hub (or to train/<run>/hub/ with --dry-run)."""
    from .evaluate.hub import push as upload

    where = upload(artifacts.find_run(p.RUN_NAME), artifacts, p.REPO_ID, dry_run=p.DRY_RUN, private=p.PRIVATE)
    print(f"{'dry run: wrote' if p.DRY_RUN else 'uploaded to'} {where}")


STEPS = {"split": split, "train": train, "generate": generate, "evaluate": evaluate, "predict": predict, "push": push}


def main(argv=None) -> int:
    """Run one step; a user error (`helpers.core.errors.UserError`: bad input, a step not done yet) is printed as one line on
    stderr, `error: ...`, with exit status 2, as argparse does for a bad option; a bug keeps its traceback."""
    args = vars(build_parser().parse_args(argv))
    step = args.pop("step")
    params = SimpleNamespace(**args)
    state = processes()
    with contextlib.ExitStack() as stack:
        if not state.is_main_process:  # one process speaks; the others' progress bars still show (stderr)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            settings = setup(params.PROFILE, params.DATA_DIR, params.ARTIFACTS_DIR)
            STEPS[step](params, settings, Artifacts(settings.artifacts_dir, params.SMOKE))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()
    return 0
