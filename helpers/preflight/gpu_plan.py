"""What `make gpu-check` measures and whether it fits: the real 7B shapes and the dry run's tiny ones, the model
checked as the plan reads it (`default_model`, or `checkpoint_model` for another `--model-id`), each part's
measurements in order (`plan`) with the memory estimate that decides which are skipped on this GPU, and the check of
the written JSON (`problems`). No model is built here."""
from __future__ import annotations

from transformers import AutoConfig

from ..core.errors import MissingError
from ..demo.tiny_models import TINY_LLAVA
from ..model.families import FAMILIES
from ..model.modeling import DEFAULT_MODEL_ID, image_tokens_per_view, load_processor, visual_tokens_per_view
from ..core.settings import GREEN_TOKEN_BUDGET, get_secret, parameter_count, torch_dtype

PARTS = ("train", "generate", "judge", "judge_engines")
OURS, SHIPPED = "helpers.judge.Judge", "green_score.green.GREEN"
GREEN_BATCH_SIZE = 8  # GREEN.__init__ fixes it
GENERATE_VIEWS = 2  # a typical IU X-Ray study: frontal + lateral
# Shapes copied from the hub checkpoints' config.json (llava-v1.6-mistral-7b-hf; GREEN-RadLlama2-7b is a Llama-2-7B).
REAL = {"llava": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu"),
                  "text": dict(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                               rope_theta=1e6, rms_norm_eps=1e-5)},
        "judge": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        # ~1,400 tokens learnt: the sample's words become whole tokens, ~430-token prompts as with a full vocabulary
        "judge_tokenizer_vocab": 4000, "name": "7b", "visual_token_modes": ("tile", "base"), "train_views": (1, 2, 3),
        "warmup_steps": 3, "measured_steps": 5, "generate_batch_sizes": (1, 8), "generate_rounds": 2,
        "max_new_tokens": 64, "judge_pairs": 8,
        # the engines part: pairs, and their answers' lengths spread over GREEN's ~100 to 600 tokens (a random judge
        # never stops, so each pair is given its length: static batches wait for their longest, as with GREEN)
        "engine_pairs": 64, "server_pairs": 16, "answer_tokens": (100, 600)}
# Tiny widths with the real image geometry; multiples of 64, so bitsandbytes' 4-bit layers also run on the CPU.
TINY = {"llava": TINY_LLAVA,
        "judge": None,  # build_random_judge's own tiny Llama
        "judge_tokenizer_vocab": 340,  # long prompts: GREEN's 2,048-token budget leaves ~120 tokens to generate
        "name": "tiny", "visual_token_modes": ("tile", "base"), "train_views": (1, 2, 3), "warmup_steps": 1,
        "measured_steps": 1, "generate_batch_sizes": (1, 2), "generate_rounds": 1, "max_new_tokens": 8,
        "judge_pairs": 2, "engine_pairs": 6, "server_pairs": 3, "answer_tokens": (4, 16)}
REQUIRED = {"train": ("visual_tokens", "views_per_study", "image_tokens_per_study", "seconds_per_step",
                      "peak_memory_gib"),
            "generate": ("load_in_4bit", "batch_size", "studies_per_s", "generated_tokens_per_s", "peak_memory_gib"),
            "judge": ("loop", "pairs", "new_tokens_per_pair", "generated_tokens_max", "seconds_per_pair",
                      "peak_memory_gib"),
            # the server's memory is another process's: `gpu_memory_used_gib` (the device's) stands for it
            "judge_engines": ("engine", "pairs", "pairs_per_s", "answer_tokens_per_s", "identical_to_static")}
# Memory estimates (`plan`). nf4 with double quantization stores 4 bits per weight, an 8-bit absmax per 64 weights
# and an fp32 constant per 256 absmax: 4.127 bits.
NF4_BYTES = 4.127 / 8
# Beside weights and KV cache: the CUDA context (~0.5 GiB), prefill activations, the cache's copy as it grows by one
# token, the allocator's fragmentation
HEADROOM_GIB = 2
PROMPT_TEXT_TOKENS = 128  # instruction and chat template around a study's image tokens (~60 with Mistral's tokenizer)


def quick(sizes: dict, settings) -> dict:
    """`sizes` for --quick (module docstring): the same measurements, fewer configurations and steps."""
    return {**sizes, "visual_token_modes": (settings.visual_tokens,), "train_views": (1, 3), "warmup_steps": 1,
            "measured_steps": min(2, sizes["measured_steps"]),
            "generate_batch_sizes": sizes["generate_batch_sizes"][-1:], "generate_rounds": 1}


def decoder_weights(shapes: dict) -> tuple[int, int]:
    """(weights of the decoder layers' linear projections, other weights) of a Llama or Mistral config: per layer q
    and o hidden² each, k and v hidden·kv_heads·head_dim each, gate, up and down hidden·intermediate each; the
    embeddings and the untied lm_head vocab·hidden each. Norms (under 0.01%) are left out."""
    hidden, head_dim = shapes["hidden_size"], shapes["hidden_size"] // shapes["num_attention_heads"]
    layer = (2 * hidden * hidden + 2 * hidden * shapes["num_key_value_heads"] * head_dim
             + 3 * hidden * shapes["intermediate_size"])
    return shapes["num_hidden_layers"] * layer, 2 * shapes["vocab_size"] * hidden


def weights_gib(model: str, load_in_4bit: bool) -> float:
    """REAL's "llava" or "judge" in 16 bits, or in 4 bits as lm.bnb_4bit_config quantizes it: nf4 for the decoder
    layers' projections only; embeddings, lm_head, LLaVA's vision tower (per CLIP layer 4·hidden² +
    2·hidden·intermediate) and projector (vision·text + text² hidden) stay 16-bit. Biases are left out."""
    text = REAL["llava"]["text"] if model == "llava" else REAL["judge"]
    quantized, other = decoder_weights(text)
    if model == "llava":
        vision = REAL["llava"]["vision"]
        width = vision["hidden_size"]
        other += (vision["num_hidden_layers"] * (4 * width ** 2 + 2 * width * vision["intermediate_size"])
                  + width * text["hidden_size"] + text["hidden_size"] ** 2)
    return (quantized * (NF4_BYTES if load_in_4bit else 2) + other * 2) / 2**30


def kv_cache_gib(shapes: dict, batch_size: int, tokens: int) -> float:
    """16-bit keys and values of every layer for `tokens` per row: 2 · layers · kv_heads · head_dim · 2 bytes ·
    batch · tokens (128 KiB a token for Mistral-7B's 8 KV heads, 512 KiB for Llama-2-7B's 32). head_dim: the
    config's, else hidden / heads."""
    head_dim = shapes.get("head_dim") or shapes["hidden_size"] // shapes["num_attention_heads"]
    return 2 * shapes["num_hidden_layers"] * shapes["num_key_value_heads"] * head_dim * 2 * batch_size * tokens / 2**30


def default_model(visual_tokens: str) -> dict:
    """The default 7B as `plan` reads it: its visual-token modes, 16-bit and 4-bit weights (GiB) and the LLM's
    shapes from REAL, a 512x512 view's image tokens in `visual_tokens` mode."""
    return {"modes": FAMILIES[0].visual_tokens, "weights_gib": {q: weights_gib("llava", q) for q in (False, True)},
            "text": REAL["llava"]["text"], "tokens_per_view": visual_tokens_per_view(512, 512, visual_tokens)}


def checkpoint_model(model_id: str, visual_tokens: str) -> dict:
    """Another checkpoint (a hub id in the local cache, or a folder) as `plan` reads it, from its config and processor
    alone: the family's visual-token modes; weights counted on the meta device (`parameter_count`), 4-bit as nf4
    for the LLM's decoder layers and 16 bits for the rest; the text config's KV shapes (every layer's full cache: an
    upper bound for Gemma 3's sliding-window layers); a 512x512 view's image tokens in a prompt of GENERATE_VIEWS
    views, as the family's processor counts them."""
    token = get_secret("HF_TOKEN")  # gated checkpoints (MedGemma)
    try:
        config = AutoConfig.from_pretrained(model_id, token=token)
    except OSError as error:  # gpu_check runs offline: a hub id must be in the cache
        raise MissingError(f"{model_id}: no config.json in such a folder nor in the local hub cache (a hub id's config "
                           f"and processor: hf download ID --exclude '*.safetensors'): "
                           f"{str(error).splitlines()[0]}") from error
    processor = load_processor(model_id, visual_tokens=visual_tokens, token=token)
    total, quantized = parameter_count(config), parameter_count(config, "model.language_model.layers")
    text = config.get_text_config()
    return {"modes": processor.family.visual_tokens,
            "weights_gib": {q: (quantized * (NF4_BYTES if q else 2) + (total - quantized) * 2) / 2**30
                            for q in (False, True)},
            "text": {k: getattr(text, k, None) for k in ("num_hidden_layers", "num_key_value_heads", "hidden_size",
                                                         "num_attention_heads", "head_dim")},
            "tokens_per_view": image_tokens_per_view(processor, 512, 512, GENERATE_VIEWS)}


def model_checked(model_id: str, visual_tokens: str) -> dict:
    """The model `make gpu-check` checks, as `plan` reads it: the default 7B from REAL, another from its config."""
    return default_model(visual_tokens) if model_id == DEFAULT_MODEL_ID else checkpoint_model(model_id, visual_tokens)


def plan(sizes: dict, settings, memory_gib: float | None, model: dict) -> dict[str, list[tuple[dict, str | None]]]:
    """Each part's measurements in order: (the fields that name it in the JSON, why it is skipped or None), for
    `settings`, the model checked (`default_model` or `checkpoint_model`: training in the visual-token modes of
    `sizes` that apply to it) and a GPU of `memory_gib` total memory.

    Generation and judge measurements carry `estimate_gib` = weights + KV cache (kv_cache_gib) at the real shapes
    (the model's; the judge's REAL), for the batch and the tokens a row ends with (generation: a study's image tokens
    + PROMPT_TEXT_TOKENS + max_new_tokens; the judge: GREEN's 2,048-token total); skipped where estimate_gib +
    HEADROOM_GIB exceeds `memory_gib`. `memory_gib` None (the dry run): nothing estimated or skipped.
    """
    def estimated(fields: dict, name: str, batch_size: int, tokens: int) -> tuple[dict, str | None]:
        if memory_gib is None:
            return {**fields, "estimate_gib": None}, None
        q = fields["load_in_4bit"]
        weights = model["weights_gib"][q] if name == "llava" else weights_gib(name, q)
        cache = kv_cache_gib(model["text"] if name == "llava" else REAL["judge"], batch_size, tokens)
        record = {**fields, "estimate_gib": round(weights + cache, 2)}
        if record["estimate_gib"] + HEADROOM_GIB <= memory_gib:
            return record, None
        return record, (f"needs ~{weights + cache:.1f} GiB ({weights:.1f} of weights + {cache:.1f} of KV cache) + "
                        f"{HEADROOM_GIB} GiB headroom, more than this GPU's {memory_gib} GiB")

    study_tokens = GENERATE_VIEWS * model["tokens_per_view"] + PROMPT_TEXT_TOKENS + sizes["max_new_tokens"]
    ours_batch, green_batch = (min(b, sizes["judge_pairs"]) for b in (settings.judge_batch_size, GREEN_BATCH_SIZE))
    precision = str(torch_dtype(settings.judge_precision)).removeprefix("torch.")
    return {"train": [({"visual_tokens": mode, "views_per_study": views}, None)
                      for mode in sizes["visual_token_modes"] if mode in model["modes"]
                      for views in sizes["train_views"]],
            "generate": [estimated({"load_in_4bit": load_in_4bit, "batch_size": batch_size}, "llava", batch_size,
                                   study_tokens)
                         for load_in_4bit in (True, False) for batch_size in sizes["generate_batch_sizes"]],
            "judge": [estimated({"loop": OURS, "dtype": precision, "load_in_4bit": settings.judge_4bit,
                                 "batch_size": ours_batch}, "judge", ours_batch, GREEN_TOKEN_BUDGET),
                      estimated({"loop": SHIPPED, "dtype": "float16", "load_in_4bit": False,
                                 "batch_size": green_batch}, "judge", green_batch, GREEN_TOKEN_BUDGET)],
            # the same pairs through each engine, as this GPU's settings run the judge; the static batch bounds
            # the estimate (the paged cache sizes itself from the free memory)
            "judge_engines": [estimated({"engine": engine, "dtype": precision, "load_in_4bit": settings.judge_4bit,
                                         "batch_size": ours_batch}, "judge", ours_batch, GREEN_TOKEN_BUDGET)
                              for engine in ("static", "continuous", "server")]}


def problems(result: dict) -> list[str]:
    """The measurements that failed, and what is missing or not positive in those measured (skipped ones have none)."""
    found = []
    for part, fields in REQUIRED.items():
        if part not in result:
            continue
        if not result[part]:
            found.append(f"{part}: no records")
        for i, record in enumerate(result[part]):
            if record.get("skipped"):
                continue
            if "error" in record:
                found.append(f"{part}[{i}] failed: {record['error'].splitlines()[0]}")
                continue
            for field in fields:
                value = record.get(field)
                if value is None and field == "peak_memory_gib" and result["dry_run"]:
                    continue  # no GPU memory on the CPU, where only the code path is checked
                if value is None or type(value) in (int, float) and value <= 0:
                    found.append(f"{part}[{i}].{field} = {value!r}")
    return found
