"""IU X-Ray studies: `annotation.json` plus `images/<id>/*.png`, checked on the way in."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

REGIONS = ("lung", "heart", "mediastinal", "bone")  # generated and scored
ALL_REGIONS = REGIONS + ("others",)  # what a split report holds; 'others' is kept, never trained or scored
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data; the message names the file, the study and what is wrong."""


@dataclass
class Study:
    id: str
    split: str
    regions: dict | None  # five region texts, or None for a val study not split yet
    original_report: str | None
    image_paths: list[Path] = field(default_factory=list)


def _parse_entry(entry, split: str, index: int, path: Path) -> Study:
    where = f"{path}: {split}[{index}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if "id" not in entry:
        raise DataError(f"{where}: missing key 'id'")
    where += f" (id {entry['id']})"
    report, original = entry.get("report"), entry.get("original_report")
    if report is None and original is None:
        raise DataError(f"{where}: missing key 'report' (and no 'original_report')")
    if report is not None:
        if not isinstance(report, dict):
            raise DataError(f"{where}: 'report' must be an object of regions, got {type(report).__name__}")
        missing = [k for k in ALL_REGIONS if k not in report]
        if missing:
            raise DataError(f"{where}: 'report' is missing region key(s) {missing}")
        bad = [k for k in ALL_REGIONS if not isinstance(report[k], str)]
        if bad:
            raise DataError(f"{where}: region text(s) {bad} are not strings")
        report = {k: report[k].strip() for k in ALL_REGIONS}
    return Study(id=str(entry["id"]), split=split, regions=report, original_report=original)


def read_annotation(path: str | Path) -> dict:
    """The raw annotation dict, with a clear error for malformed JSON or a missing split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(annotation, dict):
        raise DataError(f"{path}: expected an object with splits {SPLITS}, got {type(annotation).__name__}")
    for split in SPLITS:
        if split not in annotation:
            raise DataError(f"{path}: missing split '{split}'")
        if not isinstance(annotation[split], list):
            raise DataError(f"{path}: split '{split}' must be a list")
    return annotation


def load_studies(data_dir: str | Path, strict: bool = False, annotation_path: str | Path | None = None) -> list[Study]:
    """All studies of `data_dir`, in file order (train, val, test).

    `annotation_path` reads another annotation against the same images (e.g. notebook 01's
    `annotation_with_val.json`). Studies without images are skipped with a warning naming them
    (`strict=True` raises instead).
    """
    data_dir = Path(data_dir)
    path = Path(annotation_path) if annotation_path else data_dir / "annotation.json"
    annotation = read_annotation(path)
    studies, seen, no_images = [], set(), []
    for split in SPLITS:
        for index, entry in enumerate(annotation[split]):
            study = _parse_entry(entry, split, index, path)
            if study.id in seen:
                raise DataError(f"{path}: {split}[{index}]: duplicate study id {study.id}")
            seen.add(study.id)
            study.image_paths = sorted((data_dir / "images" / study.id).glob("*.png"))
            if not study.image_paths:
                no_images.append(study.id)
                continue
            studies.append(study)
    if no_images:
        message = (f"{data_dir / 'images'}: {len(no_images)} studies have a missing or empty image folder "
                   f"and were skipped: {', '.join(no_images[:20])}{' …' if len(no_images) > 20 else ''}")
        if strict:
            raise DataError(message)
        warnings.warn(message, stacklevel=2)
    return studies


def open_image(path: str | Path, study_id: str) -> Image.Image:
    """An RGB image; a corrupt file raises a DataError naming it and its study."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: study {study_id}: cannot read image ({e})") from None


def study_images(study: Study, max_views: int | None = None) -> list[Image.Image]:
    """The study's views as RGB, at most `max_views` of them, in file order."""
    return [open_image(p, study.id) for p in study.image_paths[:max_views]]


def by_split(studies: list[Study], split: str) -> list[Study]:
    return [s for s in studies if s.split == split]


def readable_studies(studies: list[Study], max_views: int | None = None, strict: bool = False) -> list[Study]:
    """Studies whose first `max_views` images all open; the others are named in one warning (or raise if strict)."""
    good, bad = [], []
    for study in studies:
        try:
            study_images(study, max_views)
            good.append(study)
        except DataError as e:
            if strict:
                raise
            bad.append(str(e))
    if bad:
        warnings.warn(f"{len(bad)} studies skipped for unreadable images:\n  " + "\n  ".join(bad), stacklevel=2)
    return good
