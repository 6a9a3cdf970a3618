"""IU X-Ray studies: `annotation.json` plus `images/<id>/*.{png,jpg,jpeg,dcm}`, checked on the way in."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .dicom import dicom_size, is_dicom, read_dicom

REGIONS = ("lung", "heart", "mediastinal", "bone")  # generated and scored
ALL_REGIONS = REGIONS + ("others",)  # what a split report holds; 'others' is kept, never trained or scored
SPLITS = ("train", "val", "test")
VIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")  # IU X-Ray's PNGs, MIMIC-CXR-JPG's JPEGs, DICOM; any letter case
VIEWS = "*.{png,jpg,jpeg,dcm}"  # how messages name them
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit grayscale, in each byte order PIL has


class DataError(UserError, ValueError):
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
    is named there and not in the derived copy. A study's views are its folder's PNG, JPEG and DICOM files in file-name
    order (`_view_order`); anything else there is counted in one warning. Studies without images are skipped with a
    warning naming them (`strict=True` raises instead). `require_images`: the split(s) a step needs; a DataError if
    one of them has no study with images (a missing or misplaced images folder), rather than a failure later on an
    empty list.
    """
    data_dir = Path(data_dir)
    own = data_dir / "annotation.json"
    annotation_path = Path(annotation_path) if annotation_path else own
    studies = _read(own)[1]
    if annotation_path != own:
        studies = _read(annotation_path)[1]
    ignored = []
    for study in studies:
        study.image_paths, others = _list_views(data_dir / "images" / study.id)
        ignored += others
    if ignored:  # before any error below: a folder of .tif files explains why a split has no images
        warnings.warn(f"{data_dir / 'images'}: {len(ignored)} files or folders in study folders are not views "
                      f"(only {VIEWS}, not hidden) and were ignored, e.g. {', '.join(map(str, ignored[:3]))}",
                      stacklevel=2)
    no_images = [s.id for s in studies if not s.image_paths]
    with_images = [s for s in studies if s.image_paths]
    required = (require_images,) if isinstance(require_images, str) else require_images
    empty = [split for split in required if not any(s.split == split for s in with_images)]
    if empty:
        images = data_dir / "images"
        counts = " / ".join(f"{sum(s.split == x for s in studies)} {x}" for x in empty)
        examples = [f"{images / s.id}/{VIEWS}" for s in studies if s.split in empty][:2]  # none has images
        where = f", e.g. {' or '.join(examples)}" if examples else ""
        present = next(images.iterdir(), None) if images.is_dir() else None  # shows a nested or renamed folder
        where += f"; {images} holds e.g. {present.name}" if present else f"; {images} is missing or empty"
        raise DataError(f"{images}: none of the {counts} studies has images ({len(no_images)} of the {len(studies)} "
                        f"studies in {annotation_path} lack them); expected <DATA_DIR>/images/<id>/{VIEWS}{where}")
    if no_images:
        message = (f"{data_dir / 'images'}: {len(no_images)} studies have a missing or empty image folder "
                   f"and were skipped: {', '.join(no_images[:20])}{' …' if len(no_images) > 20 else ''}")
        if strict:
            raise DataError(message)
        warnings.warn(message, stacklevel=2)
    return with_images


def _view_order(path: Path) -> tuple[list, str]:
    """File-name order with numbers compared as numbers (9.png before 10.png); the name breaks ties (1 vs 01)."""
    parts = re.split(r"(\d+)", path.name)  # the odd parts are the digit runs
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], path.name


def _list_views(folder: Path) -> tuple[list[Path], list[Path]]:
    """(views, everything else) in a study folder, each in `_view_order`. Hidden files are never views: macOS
    leaves `._0.png` resource forks beside the real `0.png` when it zips a folder."""
    if not folder.is_dir():
        return [], []
    entries = sorted(folder.iterdir(), key=_view_order)
    views = [p for p in entries if p.suffix.lower() in VIEW_SUFFIXES and not p.name.startswith(".")]
    return views, [p for p in entries if p not in views]


def _is_dicom_view(path: str | Path) -> bool:
    """A `.dcm` file, or a file of no view suffix with DICOM's marker (PNG/JPEG views: no extra read)."""
    suffix = Path(path).suffix.lower()
    return suffix == ".dcm" or (suffix not in VIEW_SUFFIXES and is_dicom(path))


def image_size(path: str | Path, study_id: str) -> tuple[int, int]:
    """(width, height) of the image `open_image` returns, from the file's header: fast on the full data set."""
    try:
        if _is_dicom_view(path):
            return dicom_size(path)
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError; ValueError: dicom's refusals
        raise DataError(f"{path}: study {study_id}: cannot read image ({e})") from None


def open_image(path: str | Path, study_id: str) -> Image.Image:
    """An RGB image, with 8 bits per channel; a file it cannot read or scale raises a DataError naming it and its study.

    DICOM (a `.dcm` file, or any file with DICOM's marker) goes through `dicom.read_dicom`: rescale, VOI LUT or
    window, MONOCHROME1 inverted; compressed pixel data decoded (JPEG, JPEG-LS, JPEG 2000, RLE); a file without the
    preamble or without its transfer syntax read all the same; multi-frame files refused.
    8-bit modes (L, P, RGB, RGBA, LA, CMYK, ...) convert as PIL does. 16-bit grayscale, common in DICOM exports, is
    scaled by its bit depth, value * 255 / 65535, where PIL's convert would clip every value above 255 to white.
    Pillow 13 opens such a PNG as I;16, older releases as I (32-bit), which in a PNG comes only from 16-bit grayscale.
    An I image of another format, and float F, have no known value range: refused rather than guessed.
    """
    try:
        if _is_dicom_view(path):
            return read_dicom(path)
        with Image.open(path) as image:
            if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
                levels = np.asarray(image, dtype=np.uint32)
                gray = (levels * 255 + 65535 // 2) // 65535  # rounded to the nearest of 256 levels
                return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
            if image.mode.startswith(("I", "F")):
                raise DataError(f"{path}: study {study_id}: cannot scale a {image.format} image of mode {image.mode} "
                                f"to 8 bits (its value range is unknown); save it as an 8- or 16-bit PNG")
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"{path}: study {study_id}: not an image (neither PNG, JPEG nor DICOM)") from None
    except (OSError, ValueError) as e:  # ValueError: dicom.read_dicom's refusals
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
