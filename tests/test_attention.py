"""Notebook 03's attention analysis on the tiny random LLaVA-NeXT: image-token layout, shares, heatmaps, plots."""
import numpy as np
import pytest
import torch

from helpers.core import data
from helpers.model import attention, generation, modeling
from helpers.evaluate import plots

MAX_VIEWS = 3


@pytest.fixture(scope="module")
def study(sample_studies):
    return next(s for s in data.by_split(sample_studies, "val") if len(s.image_paths) >= 2)


@pytest.mark.parametrize("mode", ["anyres", "tile"])
def test_layout_matches_packed_image_features(load_tiny, study, mode):
    """The assumed layout, checked against what transformers' pack_image_features really produces."""
    model, processor = load_tiny(mode)
    views = data.study_images(study, MAX_VIEWS)
    inputs = modeling.generation_inputs(processor, [views])
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                                vision_feature_layer=model.config.vision_feature_layer,
                                                vision_feature_select_strategy="default").pooler_output
        tower = model.model.vision_tower(inputs["pixel_values"][0, :1], output_hidden_states=True)
        base_tile = model.model.multi_modal_projector(tower.hidden_states[model.config.vision_feature_layer][:, 1:])[0]
    for view, features in zip(views, packed):
        layout = attention.view_layout(model.config, processor, *view.size)
        assert features.shape[0] == layout["n_tokens"]
        side = layout["side"]
        assert layout["base"].shape == (side, side) and side == 56 // 14
        newline = features[torch.as_tensor(layout["newline"])]
        assert torch.equal(newline, model.model.image_newline.expand_as(newline))  # one per high-res row
        others = np.setdiff1d(np.arange(layout["n_tokens"]), layout["newline"])
        assert not (features[torch.as_tensor(others)] == model.model.image_newline).all(-1).any()
        covered = np.concatenate([layout["base"].ravel(), layout["highres"].ravel(), layout["newline"]])
        assert sorted(covered) == list(range(layout["n_tokens"]))
    # first view: the first side² positions are the base tile's patches in row-major order (no CLS position)
    assert torch.allclose(packed[0][:side * side], base_tile, atol=1e-5)


def test_base_layout_is_the_base_grid_alone(load_tiny, study):
    """visual tokens "base": each view's image features are its base tile's patches in row-major order, nothing else."""
    model, processor = load_tiny("base")
    views = data.study_images(study, MAX_VIEWS)
    inputs = modeling.generation_inputs(processor, [views])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        patches = model.model.multi_modal_projector(tower.hidden_states[model.config.vision_feature_layer][:, 1:])
    for view, packed, expected in zip(views, features, patches):
        layout = attention.view_layout(model.config, processor, *view.size)
        side = layout["side"]
        assert layout["n_tokens"] == side * side == packed.shape[0] and layout["newline"].size == 0
        assert layout["highres"].size == 0 and sorted(layout["base"].ravel()) == list(range(side * side))
        assert torch.allclose(packed, expected, atol=1e-5)


def test_image_positions_split_per_view():
    ids = [1, 9, 9, 9, 2, 9, 9, 3]
    first, second = attention.image_positions(ids, 9, [3, 2])
    assert list(first) == [1, 2, 3] and list(second) == [5, 6]
    with pytest.raises(ValueError, match="image tokens"):
        attention.image_positions(ids, 9, [3, 3])


def test_visual_share_and_heatmaps_on_known_attention():
    side = 2
    layouts = [{"base": np.arange(4).reshape(2, 2), "n_tokens": 6}]
    positions = [np.arange(1, 7)]  # keys 1..6 are the view's image tokens, 0 and 7 are text
    a = np.zeros((2, 1, 8), dtype=np.float32)  # two generated tokens, one layer
    a[0, 0, [0, 1, 2]] = [0.5, 0.25, 0.25]
    a[1, 0, [3, 7]] = [0.6, 0.4]
    shares = attention.visual_share(a, positions, {"lung": [0], "heart": [0, 1], "bone": []})
    assert list(shares["region"]) == ["lung", "heart"]
    assert shares.set_index("region").loc["lung", "visual_share"] == pytest.approx(0.5)
    assert shares.set_index("region").loc["heart", "visual_share"] == pytest.approx(0.55)
    maps = attention.base_heatmaps(a, positions, layouts, {"lung": [0], "heart": [0, 1]})
    assert maps["lung"][0] == pytest.approx(np.array([[0.5, 0.5], [0, 0]]))
    assert maps["heart"][0].shape == (side, side) and maps["heart"][0].sum() == pytest.approx(1)


def test_analyze_study_on_the_tiny_model(model_and_processor, study, tmp_path):
    model, processor = model_and_processor
    implementation = model.config._attn_implementation
    result = attention.analyze_study(model, processor, study, max_views=MAX_VIEWS, max_new_tokens=16)
    assert model.config._attn_implementation == implementation  # eager only inside the analysis
    n_layers = model.config.text_config.num_hidden_layers
    assert result["region_tokens"] == generation.region_token_indices(processor.tokenizer, result["ids"])
    generated = generation.generate_batch(model, processor, [result["views"]], [study.id], max_new_tokens=16)
    assert generated[0]["text"] == result["text"]  # eager attention regenerates the stored prediction
    a, positions, layouts = result["attention"], result["positions"], result["layouts"]
    n = len(result["ids"])
    prompt = modeling.generation_inputs(processor, [result["views"]])["input_ids"][0].numpy()
    prompt_len = len(prompt)
    assert a.shape == (n, n_layers, prompt_len + n - 1)
    assert a.sum(-1) == pytest.approx(np.ones((n, n_layers)), abs=1e-4)  # each row is a softmax over its keys
    assert all(a[t, :, prompt_len + t:].sum() == 0 for t in range(n))  # no attention to keys not yet generated
    image_token = model.config.image_token_index
    assert sum(len(p) for p in positions) == sum(l["n_tokens"] for l in layouts) == (prompt == image_token).sum()
    assert all((prompt[p] == image_token).all() for p in positions)
    # the random model's text rarely parses into regions, so score two arbitrary token groups as well
    groups = {"lung": list(range(n // 2)), "heart": list(range(n // 2, n))}
    shares = attention.visual_share(a, positions, groups)
    assert len(shares) == 2 * n_layers
    assert ((shares["visual_share"] >= 0) & (shares["visual_share"] <= 1)).all()
    assert (shares["visual_share"] + shares["non_visual_share"]).to_numpy() == pytest.approx(np.ones(len(shares)))
    maps = attention.base_heatmaps(a, positions, layouts, groups, layers=slice(1, None))
    for per_view in maps.values():
        assert len(per_view) == len(result["views"])
        for heat, layout in zip(per_view, layouts):
            assert heat.shape == (layout["side"], layout["side"])
            assert heat.min() >= 0 and heat.sum() == pytest.approx(1)
    analysis = {**result, "shares": shares, "heatmaps": maps}
    plots.plot_shares(analysis, tmp_path / f"{study.id}_visual_share.png")
    plots.plot_heatmaps(analysis, tmp_path / f"{study.id}_heatmaps.png")
    assert {p.name for p in tmp_path.glob("*.png")} == {f"{study.id}_visual_share.png", f"{study.id}_heatmaps.png"}


def test_a_failing_study_is_named_and_skipped_not_fatal(model_and_processor, sample_studies, monkeypatch, capsys):
    model, processor = model_and_processor
    studies = data.by_split(sample_studies, "test")[:3]
    real = attention.analyze_study

    def out_of_memory_on_the_second(model, processor, study, **options):
        if study.id == studies[1].id:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")
        return real(model, processor, study, **options)

    monkeypatch.setattr(attention, "analyze_study", out_of_memory_on_the_second)
    analyses = attention.analyze_studies(model, processor, studies, max_views=MAX_VIEWS, max_new_tokens=4)
    assert [a["id"] for a in analyses] == [studies[0].id, studies[2].id]
    out = capsys.readouterr().out
    assert f"WARNING attention for {studies[1].id} skipped: OutOfMemoryError" in out
    assert "2 of 3 studies analysed, 1 skipped" in out


def test_eager_attention_estimate_for_three_anyres_views():
    """Computed: 32 heads x (3 anyres 512x512 views + ~160 text tokens)² x 8 bytes, one layer at a time."""
    from transformers import MistralConfig

    tokens = 3 * modeling.visual_tokens_per_view(512, 512, "anyres") + 160
    assert tokens == 8944
    assert attention.prompt_attention_gib(MistralConfig(num_attention_heads=32), tokens) == pytest.approx(
        32 * 8944 ** 2 * 8 / 2 ** 30)  # ~19.1 GiB: more than a T4 or an L4 has, per layer
    assert 19 < attention.prompt_attention_gib(MistralConfig(num_attention_heads=32), tokens) < 20
