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
    """One entry, checked as the notebooks use it: train/test need region reports, val needs the report text that
    notebook 01 splits (a val `report`, as in `annotation_with_val.json`, is checked like the others)."""
    where = f"{path}: {split}[{index}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if "id" not in entry:
        raise DataError(f"{where}: missing key 'id'")
    if not isinstance(entry["id"], str) or not entry["id"].strip():  # it names the image folder
        raise DataError(f"{where}: key 'id' must be a non-empty string, got {entry['id']!r}")
    where += f" (id {entry['id']})"
    report, original = entry.get("report"), entry.get("original_report")
    if split == "val" and original is None:
        raise DataError(f"{where}: missing key 'original_report' (the report text notebook 01 splits into regions)")
    if original is not None and not isinstance(original, str):
        raise DataError(f"{where}: key 'original_report' must be a string, got {type(original).__name__}")
    if split != "val" and report is None:
        raise DataError(f"{where}: missing key 'report' (an object with keys {list(ALL_REGIONS)})")
    if report is not None:
        if not isinstance(report, dict):
            raise DataError(f"{where}: key 'report' must be an object of regions, got {type(report).__name__}")
        missing = [k for k in ALL_REGIONS if k not in report]
        if missing:
            raise DataError(f"{where}: 'report' is missing region key(s) {missing} (needs {list(ALL_REGIONS)})")
        bad = [k for k in ALL_REGIONS if not isinstance(report[k], str)]
        if bad:
            raise DataError(f"{where}: 'report' region key(s) {bad} must be strings")
        report = {k: report[k].strip() for k in ALL_REGIONS}
    return Study(id=entry["id"], split=split, regions=report, original_report=original)


def _read(path: Path) -> tuple[dict, list[Study]]:
    """The raw annotation and its studies (no images yet); every split and entry is checked, so the first
    problem found anywhere in the file is named, not one hit later by a notebook."""
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
    studies, seen = [], set()
    for split in SPLITS:
        for index, entry in enumerate(annotation[split]):
            study = _parse_entry(entry, split, index, path)
            if study.id in seen:
                raise DataError(f"{path}: {split}[{index}]: duplicate study id {study.id}")
            seen.add(study.id)
            studies.append(study)
    return annotation, studies


def read_annotation(path: str | Path) -> dict:
    """The raw annotation dict, checked in full: JSON, splits, and every entry (see `_parse_entry`)."""
    return _read(Path(path))[0]


def load_studies(data_dir: str | Path, strict: bool = False, annotation_path: str | Path | None = None,
                 require_images: str | tuple[str, ...] = ()) -> list[Study]:
    """All studies of `data_dir` that have images, in file order (train, val, test).

    `annotation_path` reads another annotation against the same images (e.g. notebook 01's
    `annotation_with_val.json`); `data_dir/annotation.json` is checked first, so a problem in the user's own file
    is named there and not in the derived copy. Studies without images are skipped with a warning naming them
    (`strict=True` raises instead). `require_images`: the split(s) a step needs; a DataError if one of them has
    no study with images (a missing or misplaced images folder), rather than a failure later on an empty list.
    """
    data_dir = Path(data_dir)
    own = data_dir / "annotation.json"
    annotation_path = Path(annotation_path) if annotation_path else own
    studies = _read(own)[1]
    if annotation_path != own:
        studies = _read(annotation_path)[1]
    for study in studies:
        study.image_paths = sorted((data_dir / "images" / study.id).glob("*.png"))
    no_images = [s.id for s in studies if not s.image_paths]
    with_images = [s for s in studies if s.image_paths]
    required = (require_images,) if isinstance(require_images, str) else require_images
    empty = [split for split in required if not any(s.split == split for s in with_images)]
    if empty:
        images = data_dir / "images"
        counts = " / ".join(f"{sum(s.split == x for s in studies)} {x}" for x in empty)
        examples = [f"{images / s.id}/*.png" for s in studies if s.split in empty][:2]  # none has images
        where = f", e.g. {' or '.join(examples)}" if examples else ""
        present = next(images.iterdir(), None) if images.is_dir() else None  # shows a nested or renamed folder
        where += f"; {images} holds e.g. {present.name}" if present else f"; {images} is missing or empty"
        raise DataError(f"{images}: none of the {counts} studies has images ({len(no_images)} of the {len(studies)} "
                        f"studies in {annotation_path} lack them); expected <DATA_DIR>/images/<id>/*.png{where}")
    if no_images:
        message = (f"{data_dir / 'images'}: {len(no_images)} studies have a missing or empty image folder "
                   f"and were skipped: {', '.join(no_images[:20])}{' …' if len(no_images) > 20 else ''}")
        if strict:
            raise DataError(message)
        warnings.warn(message, stacklevel=2)
    return with_images


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
    """Studies whose first `max_views` images all open; the others are named in one warning (or raise if strict).

    A DataError if none of them opens: every caller needs at least one, and an empty list fails later, unnamed."""
    good, bad = [], []
    for study in studies:
        try:
            study_images(study, max_views)
            good.append(study)
        except DataError as e:
            if strict:
                raise
            bad.append(str(e))
    if studies and not good:
        raise DataError(f"none of the {len(studies)} studies has readable images, e.g.:\n  " + "\n  ".join(bad[:3]))
    if bad:
        warnings.warn(f"{len(bad)} studies skipped for unreadable images:\n  " + "\n  ".join(bad), stacklevel=2)
    return good
