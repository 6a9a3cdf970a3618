"""Notebook 04 baselines, judged by GREEN like the model: a frequency template and image-embedding retrieval."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..core.data import REGIONS, open_image, readable_studies
from ..core.storage import JsonlStore, atomic_write_json, run_batches


def template_regions(train_studies) -> dict[str, str]:
    """The most frequent non-empty train text of each region.

    Non-empty: in the real train split the most frequent bone "text" is empty (894 of 2,069), and an empty template
    would score 0 on every study the headline counts (reference non-empty), which is no baseline at all.
    """
    return {region: Counter(s.regions[region] for s in train_studies if s.regions[region]).most_common(1)[0][0]
            for region in REGIONS}


def template_predictions(train_studies, queries) -> dict[str, dict]:
    regions = template_regions(train_studies)
    return {s.id: {"id": s.id, "regions": dict(regions)} for s in queries}


def image_embeddings(model, processor, studies, max_views: int, batch_size: int = 32):
    """One unit vector per study: the mean of its views' pooled vision-tower features (base tile: the whole image).

    `model, processor` are loaded with visual_tokens="base". Views are read batch by batch, through the batch runner
    (halved on out-of-memory); the features stay in memory (the neighbours are what retrieval_neighbors caches).
    """
    tower = model.model.vision_tower
    dtype = next(tower.parameters()).dtype
    views = [(i, path, study.id) for i, study in enumerate(studies) for path in study.image_paths[:max_views]]

    def embed(batch):
        images = [open_image(path, study_id) for _, path, study_id in (views[k] for k in batch)]
        # the "base" visual-token processor: one tile per view, the whole image squashed to the tile size
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = tower(pixel_values=pixels.to(tower.device, dtype))
            # CLIP pools its class token; a SigLIP tower without its head (LLaVA-interleave, OneVision) pools
            # nothing: the mean of its patches stands in
            pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(dim=1)
        unit = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
        return [{"view": k, "features": f} for k, f in zip(batch, unit)]

    store = JsonlStore(None, key_field="view")
    run_batches(store, list(range(len(views))), lambda k: k, embed, batch_size=batch_size, desc="image embeddings",
                unit="view")
    features = np.stack([store.get(k)["features"] for k in range(len(views))])
    owner = np.array([i for i, _, _ in views])
    embeddings = np.stack([features[owner == i].mean(axis=0) for i in range(len(studies))])
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def nearest_train_studies(train_embeddings, train_studies, query_embeddings, queries) -> dict[str, dict]:
    """For each query study, the train study with the highest cosine similarity."""
    similarity = query_embeddings @ train_embeddings.T
    best = similarity.argmax(axis=1)
    return {q.id: {"train_id": train_studies[j].id, "similarity": float(similarity[i, j])}
            for i, (q, j) in enumerate(zip(queries, best))}


def retrieval_neighbors(cache_path: str | Path, model_id: str, train_studies, queries, max_views: int,
                        load_model) -> dict[str, dict]:
    """Nearest train study per query by image embedding, cached in a JSON file for these settings.

    Studies with an unreadable image are skipped (named in a warning), so a query may have no neighbour.
    `load_model()` returns (model, processor); it is called only when the cache is missing or stale, so a rerun
    reads no image and loads no model.
    """
    cache_path = Path(cache_path)
    settings = {"model": model_id, "max_views": max_views, "train": sorted(s.id for s in train_studies),
                "queries": sorted(q.id for q in queries)}
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
        if cached["settings"] == settings:
            print(f"retrieval: {len(cached['neighbors'])} neighbours from {cache_path}")
            return cached["neighbors"]
    train_studies, queries = readable_studies(train_studies, max_views), readable_studies(queries, max_views)
    model, processor = load_model()
    neighbors = nearest_train_studies(image_embeddings(model, processor, train_studies, max_views), train_studies,
                                      image_embeddings(model, processor, queries, max_views), queries)
    atomic_write_json(cache_path, {"settings": settings, "neighbors": neighbors})
    return neighbors


def retrieval_predictions(train_studies, neighbors: dict[str, dict]) -> dict[str, dict]:
    """Each query gets the four region texts of its nearest train study."""
    train = {s.id: s for s in train_studies}
    return {qid: {"id": qid, "regions": {r: train[n["train_id"]].regions[r] for r in REGIONS}, **n}
            for qid, n in neighbors.items()}
