"""`make gpu-check` in its dry run (every part on the CPU at tiny widths, one JSON with the expected records), its
--quick mode, its failure handling, and the fit rules it applies on the GPUs users have."""
import json

import pytest
import torch

from safetensors import safe_open

from helpers.core import settings
from helpers.core.errors import MissingError
from helpers.demo import tiny_models
from helpers.model import modeling
from helpers.preflight import gpu_check, gpu_judge, gpu_plan


def positive(record, *fields):
    return all(isinstance(record[f], (int, float)) and record[f] > 0 for f in fields)


def record_writes(monkeypatch, out) -> list[list[int]]:
    """Each write of `out`: its number of records per part, in gpu_plan.PARTS order."""
    written, write = [], gpu_check.atomic_write_json
    monkeypatch.setattr(gpu_check, "atomic_write_json", lambda path, obj: (
        path == out and written.append([len(obj.get(part, [])) for part in gpu_plan.PARTS]), write(path, obj)))
    return written


def test_dry_run_measures_every_part_and_writes_after_each_measurement(tmp_path, monkeypatch):
    """`make gpu-check`'s run, every part, on the CPU at tiny widths."""
    out = tmp_path / "gpu_check.json"
    written = record_writes(monkeypatch, out)
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    # one write per measurement, each adding one record: 6 training cells, 4 generation cells, 2 judge loops,
    # 3 judge engines
    added = [[now - before for before, now in zip(previous, current)]
             for previous, current in zip([[0] * len(gpu_plan.PARTS)] + written, written)]
    assert all(sorted(step) == [0, 0, 0, 1] for step in added) and written[-1] == [6, 4, 2, 3]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["quick"] is False and result["device"]["transformers"]
    assert gpu_plan.problems(result) == []

    measured = result["train"]
    assert [(r["visual_tokens"], r["views_per_study"]) for r in measured] == [(m, v) for m in ("tile", "base")
                                                                              for v in (1, 2, 3)]
    for r in measured:
        assert positive(r, "seconds_per_step", "image_tokens_per_study", "text_tokens_per_study_approx")
        assert r["load_in_4bit"] and r["measured_steps"] > 0 and r["peak_memory_gib"] is None  # no GPU here
        # the real geometry: 1,176 tokens per square view with one 336 tile, 576 with the base tile alone
        assert r["image_tokens_per_study"] == {"tile": 1176, "base": 576}[r["visual_tokens"]] * r["views_per_study"]

    assert [(r["load_in_4bit"], r["batch_size"]) for r in result["generate"]] == [(q, b) for q in (True, False)
                                                                                 for b in (1, 2)]
    assert all(positive(r, "studies_per_s", "generated_tokens_per_s", "generated_tokens_per_study")
               and r["estimate_gib"] is None for r in result["generate"])  # nothing estimated for tiny models

    ours, shipped = result["judge"]
    assert (ours["loop"], shipped["loop"]) == ("helpers.judge.Judge", "green_score.green.GREEN")
    assert (ours["dtype"], ours["load_in_4bit"], shipped["dtype"]) == ("float32", False, "float16")  # CPU settings
    assert ours["new_tokens_per_pair"] == shipped["new_tokens_per_pair"] > 0
    assert ours["generated_tokens_max"] == shipped["generated_tokens_max"] == ours["new_tokens_per_pair"]
    assert positive(ours, "seconds_per_pair") and positive(shipped, "seconds_per_pair")
    assert shipped["same_responses"] is None  # ours ran in fp32, GREEN in fp16: not comparable

    # the engines on the same pairs, on the CPU in fp32: every engine gives static's answers
    engines = {r["engine"]: r for r in result["judge_engines"]}
    assert list(engines) == ["static", "continuous", "server"]
    assert all(r["identical_to_static"] == 1.0 and positive(r, "pairs_per_s", "answer_tokens_per_s")
               for r in engines.values())
    assert engines["static"]["pairs"] == engines["continuous"]["pairs"] > engines["server"]["pairs"]


def test_quick_parts_add_up_and_a_failure_does_not_stop_the_run(tmp_path, monkeypatch):
    """--quick, one part at a time (its measurements are the full run's, on fewer cells): training and generation;
    then the judge with our loop failing and GREEN in a child process (as on a machine with two GPUs): the earlier
    records stay, the failure is recorded, the next measurement still runs."""
    out, workdir = tmp_path / "gpu_check.json", str(tmp_path / "work")
    written = record_writes(monkeypatch, out)
    for part in ("train", "generate"):
        assert gpu_check.main(["--dry-run", "--quick", "--part", part, "--out", str(out), "--workdir", workdir]) == 0
    # the same machine and mode: the second part's records join the first's, one write per measurement
    assert written == [[1, 0, 0, 0], [2, 0, 0, 0], [2, 1, 0, 0], [2, 2, 0, 0]]
    quick = json.loads(out.read_text())
    assert quick["quick"] is True and quick["dry_run"] is True
    assert [(r["visual_tokens"], r["views_per_study"]) for r in quick["train"]] == [("base", 1), ("base", 3)]
    assert [(r["load_in_4bit"], r["batch_size"]) for r in quick["generate"]] == [(True, 2), (False, 2)]
    assert gpu_plan.problems(quick) == []

    measure = gpu_check.Check.measure_judge

    def ours_fails(check, fields):
        if fields["loop"] == gpu_plan.OURS:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return measure(check, fields)

    monkeypatch.setattr(gpu_check.Check, "measure_judge", ours_fails)
    real_env = gpu_check.shipped_green_env
    monkeypatch.setattr(gpu_check, "shipped_green_env", lambda count, environ: real_env(2, environ))
    written.clear()
    assert gpu_check.main(["--dry-run", "--quick", "--part", "judge", "--out", str(out), "--workdir", workdir]) == 1
    assert written == [[2, 2, 1, 0], [2, 2, 2, 0]]
    result = json.loads(out.read_text())
    assert result["train"] == quick["train"] and result["generate"] == quick["generate"]
    failed, shipped = result["judge"]
    assert failed["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB"
    assert positive(shipped, "seconds_per_pair", "generated_tokens_max") and shipped["same_responses"] is None
    assert gpu_plan.problems(result) == ["judge[0] failed: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                          "8.00 GiB"]


@pytest.fixture(scope="module")
def llava_qwen_dir(tmp_path_factory, sample_studies):
    """A non-default family's tiny replica (a LLaVA with a Qwen2 LLM and a SigLIP tower), in a folder of its own."""
    return tiny_models.build_random_llava_qwen(tmp_path_factory.mktemp("outside") / "llava-qwen",
                                               tiny_models.tokenizer_corpus(sample_studies))


def test_dry_run_checks_another_model_id(tmp_path, llava_qwen_dir):
    """--model-id of another family, --quick, training then generation: a random model of its config and its own
    processor, trained and generated through the project's loaders, in the family's only visual-token mode."""
    out, workdir = tmp_path / "gpu_check.json", str(tmp_path / "work")
    for part in ("train", "generate"):
        assert gpu_check.main(["--dry-run", "--quick", "--part", part, "--model-id", str(llava_qwen_dir), "--out",
                               str(out), "--workdir", workdir]) == 0
    result = json.loads(out.read_text())
    assert result["model_id"] == str(llava_qwen_dir) and gpu_plan.problems(result) == []
    side = tiny_models.TINY_IMAGE_SIZE // 14  # SigLIP's whole view squashed to its tile: side² tokens, no CLS
    assert [(r["visual_tokens"], r["views_per_study"], r["image_tokens_per_study"]) for r in result["train"]] == [
        ("base", 1, side * side), ("base", 3, 3 * side * side)]
    assert [(r["load_in_4bit"], r["batch_size"]) for r in result["generate"]] == [(True, 2), (False, 2)]
    built = json.loads((tmp_path / "work" / "llava-qwen" / "model" / tiny_models.BUILT_NOTE).read_text())
    assert built["class"] == "LlavaForConditionalGeneration"  # the replica's architecture, new random weights


def test_another_model_is_planned_from_its_parameters_and_tokens_per_view(llava_qwen_dir, monkeypatch):
    """checkpoint_model's weights against the replica's saved tensors (16-bit; 4-bit: nf4 for the LLM's decoder
    layers), its KV shapes from the config, a view's tokens as its processor counts them; plan's estimates from them,
    and the skip rule on a GPU too small for them."""
    model = gpu_plan.checkpoint_model(str(llava_qwen_dir), "base")
    with safe_open(llava_qwen_dir / "model.safetensors", "pt") as saved:
        sizes = {k: saved.get_slice(k).get_shape() for k in saved.keys()}
    count = lambda keep: sum(torch.Size(shape).numel() for k, shape in sizes.items() if keep(k))
    # the decoder layers under the name the checkpoint saves them (LLaVA's hub layout), model.language_model.layers
    total, decoder = count(lambda k: True), count(lambda k: k.startswith("language_model.model.layers."))
    assert model["weights_gib"][False] == pytest.approx(2 * total / 2**30)
    assert model["weights_gib"][True] == pytest.approx((decoder * gpu_plan.NF4_BYTES + (total - decoder) * 2) / 2**30)
    text = json.loads((llava_qwen_dir / "config.json").read_text())["text_config"]
    assert {k: model["text"][k] for k in ("num_hidden_layers", "num_key_value_heads")} == {
        k: text[k] for k in ("num_hidden_layers", "num_key_value_heads")}
    assert model["modes"] == ("base",) and model["tokens_per_view"] == (tiny_models.TINY_IMAGE_SIZE // 14) ** 2
    monkeypatch.setattr(settings, "gpu", lambda: ("Tesla T4", 14.7, (7, 5)))
    t4 = settings.resolve()
    tokens = 2 * model["tokens_per_view"] + gpu_plan.PROMPT_TEXT_TOKENS + gpu_plan.REAL["max_new_tokens"]
    for memory in (14.7, 1.9):  # a T4; a GPU without room for the headroom
        for fields, why in gpu_plan.plan(gpu_plan.REAL, t4, memory, model)["generate"]:
            weights = model["weights_gib"][fields["load_in_4bit"]]
            expected = weights + gpu_plan.kv_cache_gib(model["text"], fields["batch_size"], tokens)
            assert fields["estimate_gib"] == round(expected, 2) and (why is None) == (memory == 14.7), (fields, why)
    with pytest.raises(MissingError, match="someone/uncached: no config.json .* hf download ID --exclude"):
        gpu_plan.checkpoint_model("someone/uncached", "base")  # offline (conftest): only the cache is read


def test_problems_names_failures_and_missing_fields_but_not_skipped_records():
    result = {"dry_run": False,
              "train": [{"visual_tokens": "tile", "views_per_study": 1, "image_tokens_per_study": 576,
                         "seconds_per_step": 0.0, "peak_memory_gib": None}],
              "generate": [{"load_in_4bit": False, "batch_size": 8, "estimate_gib": 15.4, "skipped": True,
                            "why": "needs ~15.4 GiB"},
                           {"load_in_4bit": True, "batch_size": 8, "estimate_gib": 5.76,
                            "error": "OutOfMemoryError: CUDA out of memory.\nTried to allocate 2.00 GiB"},
                           {"load_in_4bit": True, "batch_size": 1, "estimate_gib": 4.61, "studies_per_s": 0.5,
                            "generated_tokens_per_s": 30.0, "peak_memory_gib": 5.1}],
              "judge": []}
    assert gpu_plan.problems(result) == ["train[0].seconds_per_step = 0.0", "train[0].peak_memory_gib = None",
                                          "generate[1] failed: OutOfMemoryError: CUDA out of memory.",
                                          "judge: no records"]


def test_estimates_count_the_real_models_weights():
    """weights_gib's formula against the parameters of the real architectures built on the meta device."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, MistralConfig)

    with torch.device("meta"):
        llava = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=CLIPVisionConfig(**gpu_plan.REAL["llava"]["vision"], image_size=336, patch_size=14),
            text_config=MistralConfig(**gpu_plan.REAL["llava"]["text"])))
        judge = LlamaForCausalLM(LlamaConfig(**gpu_plan.REAL["judge"]))
    for model, name in ((llava, "llava"), (judge, "judge")):
        counted = sum(p.numel() for p in model.parameters()) * 2 / 2**30
        assert gpu_plan.weights_gib(name, False) == pytest.approx(counted, rel=1e-3)
    assert gpu_plan.weights_gib("llava", True) == pytest.approx(4.44, abs=0.01)  # nf4 projections, 16-bit rest
    assert gpu_plan.kv_cache_gib(gpu_plan.REAL["judge"], 8, 2048) == 8  # 512 KiB per Llama-2-7B token


# (name, GiB, capability) -> the measurements skipped, and how our judge loop runs (4-bit?, batch)
GPUS = {"T4": ((14.7, (7, 5)), {("generate", False, 1), ("generate", False, 8), ("judge", gpu_plan.SHIPPED)},
               (True, 8)),
        "L4": ((22.2, (8, 9)), {("judge", gpu_plan.SHIPPED)}, (False, 4)),
        "A100-40GB": ((39.4, (8, 0)), set(), (False, 8)),
        "80GB": ((79.1, (9, 0)), set(), (False, 8))}


@pytest.mark.parametrize("name", GPUS)
def test_fit_decisions(name, monkeypatch):
    (memory, capability), skipped, (judge_4bit, judge_batch) = GPUS[name]
    monkeypatch.setattr(settings, "gpu", lambda: (name, memory, capability))
    on_this_gpu = settings.resolve()
    for sizes in (gpu_plan.REAL, gpu_plan.quick(gpu_plan.REAL, on_this_gpu)):
        planned = gpu_plan.plan(sizes, on_this_gpu, memory, gpu_plan.model_checked(modeling.DEFAULT_MODEL_ID,
                                                                                   on_this_gpu.visual_tokens))
        assert [fields for fields, _ in planned["train"]] == [
            {"visual_tokens": m, "views_per_study": v} for m in sizes["visual_token_modes"]
            for v in sizes["train_views"]]  # training (QLoRA, batch 1) is measured everywhere
        generate = {("generate", f["load_in_4bit"], f["batch_size"]): why for f, why in planned["generate"]}
        judge = {("judge", f["loop"]): why for f, why in planned["judge"]}
        assert {key for key, why in {**generate, **judge}.items() if why} == {
            key for key in skipped if key in generate or key in judge}
        assert all("GiB headroom" in why for why in {**generate, **judge}.values() if why)
        ours, shipped = (fields for fields, _ in planned["judge"])
        assert (ours["dtype"], ours["load_in_4bit"], ours["batch_size"]) == ("float16", judge_4bit, judge_batch)
        assert (shipped["dtype"], shipped["load_in_4bit"], shipped["batch_size"]) == ("float16", False, 8)
        assert shipped["estimate_gib"] == pytest.approx(20.55)  # 12.55 GiB of fp16 weights + 8 GiB of KV cache


def test_shipped_green_gets_one_gpu_in_a_child_process_only_where_several_are_visible():
    assert gpu_judge.shipped_green_env(0, {}) is None and gpu_judge.shipped_green_env(1, {"A": "1"}) is None
    assert gpu_judge.shipped_green_env(2, {"A": "1"}) == {"A": "1", "CUDA_VISIBLE_DEVICES": "0"}
    assert gpu_judge.shipped_green_env(2, {"CUDA_VISIBLE_DEVICES": "3, 1"})["CUDA_VISIBLE_DEVICES"] == "3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_refuses_to_measure_without_a_gpu(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out.json").exists()
