"""Notebook 03: where generated report tokens look: per-layer visual attention share, base-grid heatmaps, confidence.

Layout of one view's `<image>` positions in LLaVA-NeXT (checked against transformers' `pack_image_features`):
with vision_feature_select_strategy="default" the CLS output of every tile is dropped before projection (and the
processor's +1 for it is subtracted again), so there is no CLS position: the first (S/p)² positions are the base
tile (the whole image squashed to S×S) in row-major order, then the unpadded high-resolution grid row by row, each
row followed by the learned `image_newline` position. With visual tokens "base" (a plain LLaVA model) a view is
the base tile alone. LLaVA with a SigLIP tower (vision_feature_select_strategy="full", no CLS) is that plain layout:
each view a side×side block, the views abutting with no separator. LLaVA-OneVision: several views are each that block
and one newline position; a lone view is tiled as in LLaVA-NeXT. Gemma 3: a 16x16 pooled block a view, between
<start_of_image> and <end_of_image>. Qwen2.5-VL: the view's resized grid over 28 px squares, row-major, between
<|vision_start|> and <|vision_end|>.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..core.errors import OptionError
from ..core.data import study_images
from .generation import generated_length, region_token_indices, token_char_ends
from .modeling import generation_inputs, image_tokens_per_view
from ..core.storage import JsonlStore, run_batches


def view_layout(model_config, processor, width: int, height: int, views: int = 1) -> dict:
    """Offsets within one view's image positions, in a prompt of `views` views: `base` (side×side; Qwen2.5-VL's
    rows×cols follow the view's shape, `side` its rows), `highres` (rows×cols), `newline` (rows).

    A plain LLaVA config (visual tokens "base") has the base grid only: `highres` and `newline` are empty. Several
    views of a `Family.view_newline` family (LLaVA-OneVision) are each the base grid and one newline; its single view
    is tiled like LLaVA-NeXT's (the grid scaled down past anyres_max_9: its cells are then not tiles' patches, and
    the heatmaps read the base grid only).
    """
    strategy = getattr(model_config, "vision_feature_select_strategy", None)
    if strategy not in (None, "default") and getattr(processor, "num_additional_image_tokens", 0):
        raise ValueError(f"vision_feature_select_strategy={strategy!r} keeps "
                         f"the tower's {processor.num_additional_image_tokens} CLS output(s): the layout assumes none")
    vision = model_config.vision_config
    if getattr(vision, "spatial_merge_size", None):  # Qwen2.5-VL: the view resized as its processor resizes it,
        image_processor = processor.image_processor  # its 14 px patches merged 2x2, row-major
        factor = image_processor.patch_size * vision.spatial_merge_size
        resized = smart_resize(height, width, factor, min_pixels=image_processor.size["shortest_edge"],
                               max_pixels=image_processor.size["longest_edge"])
        shape = (resized[0] // factor, resized[1] // factor)
    else:  # Gemma 3 pools the tower's patches to mm_tokens_per_image, a square grid
        side = math.isqrt(getattr(model_config, "mm_tokens_per_image", 0)) or vision.image_size // vision.patch_size
        shape = (side, side)
    base = shape[0] * shape[1]
    n = image_tokens_per_view(processor, width, height, views)
    rows, cols = 0, 0
    if views > 1 and processor.family.view_newline:
        rows = 1  # one newline, no grid
    elif hasattr(model_config, "image_grid_pinpoints"):  # the unpadded high-resolution grid follows
        tile, side = vision.image_size, shape[0]
        best_h, best_w = select_best_resolution([height, width], model_config.image_grid_pinpoints)
        # the processor's own count of the unpadded grid, so offsets agree with the number of <image> tokens
        unpadded, rows = processor._get_unpadded_features(height, width, side, side, best_h // tile, best_w // tile)
        cols = unpadded // rows
    if base + rows * (cols + 1) != n:
        raise ValueError(f"image {width}x{height}: layout {shape[0]}x{shape[1]}+{rows}x({cols}+1) != {n} image tokens")
    grid = base + np.arange(rows * (cols + 1)).reshape(rows, cols + 1)
    return {"side": shape[0], "base": np.arange(base).reshape(shape), "highres": grid[:, :cols],
            "newline": grid[:, cols], "n_tokens": n}


def image_positions(input_ids, image_token_id: int, tokens_per_view: list[int]) -> list[np.ndarray]:
    """Absolute positions of each view's image tokens in one prompt (views appear in order)."""
    positions = np.flatnonzero(np.asarray(input_ids) == image_token_id)
    if len(positions) != sum(tokens_per_view):
        raise ValueError(f"{len(positions)} image tokens in the prompt, the processor counts {sum(tokens_per_view)}")
    return np.split(positions, np.cumsum(tokens_per_view)[:-1])


@contextmanager
def eager_attention(model):
    """Eager attention (the only kind that computes attention weights) for the duration of the block."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def generate_with_attention(model, processor, views: list, *, max_new_tokens: int = 128) -> dict:
    """Greedy generation for one study, keeping each text layer's attention row (mean over heads) per new token.

    output_attentions would keep every layer's full prompt×prompt matrix (32 layers × 32 heads × 3,600² × 2
    bytes ≈ 26 GB for three views on the 7B), so forward hooks on the attention modules (what transformers' own
    recorder hooks) keep only the last query row of each step. Returns `ids` (generated, up to EOS),
    `attention` (tokens × layers × keys, zero for keys that did not exist yet or left a layer's window) and the prompt's `input_ids`.
    """
    layers = [m for name, m in model.named_modules() if name.endswith("self_attn") and "language_model" in name]
    rows = [[] for _ in layers]

    def hook(index):
        def record(module, args, output):
            if output[1] is None:
                raise RuntimeError("attention weights are not computed: use eager attention")
            rows[index].append(output[1][0, :, -1, :].float().mean(0))
        return record

    inputs = generation_inputs(processor, [views], model)
    check_attention_fits(model, inputs)
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with eager_attention(model), torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    finally:
        for handle in handles:
            handle.remove()
    prompt_len = inputs["input_ids"].shape[1]
    generated = out[0, prompt_len:].tolist()
    n = generated_length(model, generated)
    keys = prompt_len + n - 1
    attention = np.zeros((n, len(layers), keys), dtype=np.float32)
    for layer, steps in enumerate(rows):
        for t in range(n):
            # a sliding-window layer (Gemma 3's) caches only the last `sliding_window` keys: its row ends at the query
            row = steps[t].cpu().numpy()
            attention[t, layer, prompt_len + t - len(row):prompt_len + t] = row
    return {"ids": generated[:n], "attention": attention, "input_ids": inputs["input_ids"][0].cpu().numpy()}


def visual_share(attention: np.ndarray, positions: list[np.ndarray], region_tokens: dict[str, list[int]]):
    """Per region and layer: mean share of attention on image positions, and on everything else (they sum to 1)."""
    visual = np.concatenate(positions)
    rows = []
    for region, idx in region_tokens.items():
        if not idx:
            continue
        a = attention[idx]  # tokens × layers × keys
        total = a.sum(-1)
        share = a[..., visual].sum(-1) / total
        for layer in range(a.shape[1]):
            rows.append({"region": region, "layer": layer, "visual_share": share[:, layer].mean(),
                         "non_visual_share": (1 - share[:, layer]).mean(), "n_tokens": len(idx)})
    return pd.DataFrame(rows, columns=["region", "layer", "visual_share", "non_visual_share", "n_tokens"])


def base_heatmaps(attention: np.ndarray, positions: list[np.ndarray], layouts: list[dict],
                  region_tokens: dict[str, list[int]], layers=None) -> dict[str, list[np.ndarray]]:
    """Per region, one side×side map per view: attention to the base tile (mean over tokens and `layers`), sum 1."""
    layers = slice(None) if layers is None else layers
    maps = {}
    for region, idx in region_tokens.items():
        if not idx:
            continue
        a = attention[idx][:, layers].mean(axis=(0, 1))
        maps[region] = []
        for view_positions, layout in zip(positions, layouts):
            grid = a[view_positions[layout["base"]]]  # row-major base tile, newline positions never touched
            maps[region].append(grid / grid.sum() if grid.sum() > 0 else grid)
    return maps


def prompt_attention_gib(model_config, prompt_tokens: int) -> float:
    """Computed peak (GiB) of eager attention over the prompt in one layer: its heads' prompt x prompt scores in 16
    bits, their fp32 softmax and its 16-bit copy (eager attention upcasts the softmax), 8 bytes a score."""
    text = getattr(model_config, "text_config", model_config)
    return text.num_attention_heads * prompt_tokens ** 2 * 8 / 2 ** 30


def check_attention_fits(model, inputs) -> None:
    """Refuse, before generating, a prompt whose eager attention cannot fit in this GPU's free memory."""
    if not torch.cuda.is_available():
        return
    needed = prompt_attention_gib(model.config, inputs["input_ids"].shape[1])
    free = torch.cuda.mem_get_info(model.device)[0] / 2 ** 30
    if needed > free:
        raise MemoryError(f"eager attention over this {inputs['input_ids'].shape[1]}-token prompt needs ~{needed:.1f} "
                          f"GiB per layer (computed), {free:.1f} GiB are free: fewer views or visual tokens 'base' fit")


def analyze_study(model, processor, study, *, max_views: int, max_new_tokens: int = 128, layers=None) -> dict:
    """Regenerate one study with attention: text, token ids, region token indices, share table, base heatmaps.

    Also returns the raw `attention` (tokens × layers × keys), each view's image `positions` and `layouts`, to
    look at other layers or token groups with `visual_share` / `base_heatmaps`, and each token's end in `text`
    (`char_ends`).
    """
    views = study_images(study, max_views)
    result = generate_with_attention(model, processor, views, max_new_tokens=max_new_tokens)
    layouts = [view_layout(model.config, processor, *v.size, len(views)) for v in views]
    positions = image_positions(result["input_ids"], model.config.image_token_id, [l["n_tokens"] for l in layouts])
    regions = region_token_indices(processor.tokenizer, result["ids"])
    return {"id": study.id, "views": views, "ids": result["ids"],
            "text": processor.tokenizer.decode(result["ids"], skip_special_tokens=True), "region_tokens": regions,
            "shares": visual_share(result["attention"], positions, regions),
            "heatmaps": base_heatmaps(result["attention"], positions, layouts, regions, layers),
            "attention": result["attention"], "positions": positions, "layouts": layouts,
            "char_ends": token_char_ends(processor.tokenizer, result["ids"])}


def chosen_studies(splits: dict[str, list], ids: list[str] | None = None, first: int = 3) -> list:
    """The studies named by `ids` (val or test), else the first `first` val studies."""
    by_id = {s.id: s for items in splits.values() for s in items}
    unknown = sorted(set(ids or ()) - set(by_id))
    if unknown:
        raise OptionError(f"ATTENTION_IDS not among the readable val/test studies: {unknown}")
    return [by_id[i] for i in ids] if ids else splits["val"][:first]


def analyze_studies(model, processor, studies, **options) -> list[dict]:
    """`analyze_study` for each study through the batch runner (one study a batch: the attention rows of a whole
    generation are kept), printing what the model wrote. A diagnostic after the predictions are saved: a study that
    fails (out of memory, a prompt too long for eager attention) is named with why and counted, the others go on."""
    failed = {}

    def analyze(batch):
        try:
            analysis = analyze_study(model, processor, batch[0], **options)
        except Exception as error:  # noqa: BLE001  (named and counted below; never stops the notebook)
            failed[batch[0].id] = f"{type(error).__name__}: {error}"
            return []
        print(f"{analysis['id']}: {analysis['text']!r}")
        return [analysis]

    store = JsonlStore(None, key_field="id")  # in memory: attention arrays are not JSON
    run_batches(store, studies, lambda s: s.id, analyze, batch_size=1, desc="attention", unit="study",
                progress=False)
    for study_id, why in failed.items():
        print(f"WARNING attention for {study_id} skipped: {why}")
    if failed:
        print(f"attention: {len(studies) - len(failed)} of {len(studies)} studies analysed, {len(failed)} skipped")
    return [store.get(s.id) for s in studies if s.id in store]
