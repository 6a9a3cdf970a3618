"""Rebuild the bundled sample: real report texts from the IU X-Ray annotation, synthetic images.

    python data/sample/make_sample.py ../shared/iu_xray/annotation.json

Deterministic: the same annotation gives the same files. Images are drawn, not real X-rays: a dark
thorax with two lung fields, a bright mediastinum and heart, ribs and a spine, with per-study noise,
so that views differ and image code paths (aspect ratio, 1-3 views, grayscale PNG) are exercised.
"""
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
COUNTS = {"train": 16, "val": 4, "test": 4}


def pick(entries, n, rng):
    """Half normal-looking reports, half with an empty region, so both cases are in the sample."""
    with_empty = [e for e in entries if "report" in e and any(not e["report"][k] for k in ("mediastinal", "bone"))]
    rest = [e for e in entries if e not in with_empty]
    if not with_empty:  # val entries carry no split yet
        return rng.sample(entries, n)
    return rng.sample(with_empty, n // 2) + rng.sample(rest, n - n // 2)


def draw_view(rng, lateral: bool) -> Image.Image:
    w, h = (176, 160) if lateral else (160, 192)
    image = Image.new("L", (w, h), 30)
    d = ImageDraw.Draw(image)
    d.ellipse([8, 10, w - 8, h - 6], fill=70)  # body
    if lateral:
        d.ellipse([30, 30, w - 40, h - 30], fill=35)  # lungs overlap
        d.ellipse([40, 70, 100, h - 35], fill=150)  # heart
        d.rectangle([w - 38, 15, w - 26, h - 10], fill=200)  # spine
    else:
        d.ellipse([18, 25, w // 2 - 6, h - 25], fill=25)  # right lung
        d.ellipse([w // 2 + 6, 25, w - 18, h - 25], fill=25)  # left lung
        d.rectangle([w // 2 - 9, 10, w // 2 + 9, h - 10], fill=185)  # mediastinum / spine
        heart = rng.randint(28, 48)  # cardiac size varies between studies
        d.ellipse([w // 2 - 15, h - 90, w // 2 + heart, h - 35], fill=170)
        for y in range(35, h - 40, 16):  # ribs
            d.arc([14, y, w // 2, y + 30], 180, 300, fill=120, width=2)
            d.arc([w // 2, y, w - 14, y + 30], 240, 360, fill=120, width=2)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, (h, w))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1.2))


def main(annotation_path: str) -> None:
    rng = random.Random(0)
    full = json.loads(Path(annotation_path).read_text())
    sample = {split: pick(full[split], n, rng) for split, n in COUNTS.items()}
    (HERE / "annotation.json").write_text(json.dumps(sample, indent=2, ensure_ascii=False) + "\n")
    for split in COUNTS:
        for entry in sample[split]:
            folder = HERE / "images" / entry["id"]
            folder.mkdir(parents=True, exist_ok=True)
            n_views = rng.choice([1, 2, 2, 3])
            order = [False, True, False][:n_views]
            rng.shuffle(order)  # frontal/lateral order is not consistent in the real data either
            for i, lateral in enumerate(order):
                draw_view(rng, lateral).save(folder / f"{i}.png", optimize=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE.parents[2] / "shared" / "iu_xray" / "annotation.json"))
