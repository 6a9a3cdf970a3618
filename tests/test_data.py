import json
import shutil
import warnings

import numpy as np
import pytest
from conftest import ROOT, SHARED_IU_XRAY, needs_shared
from PIL import Image, PngImagePlugin

from helpers.core.data import (ALL_REGIONS, _parse_entry, by_split, load_studies, open_image, read_annotation,
                          readable_studies, study_images)
from helpers.core.data import DataError
from helpers.core.storage import JsonlStore, atomic_write_json


def make_data(tmp_path, annotation, image_ids):
    (tmp_path / "annotation.json").write_text(annotation if isinstance(annotation, str) else json.dumps(annotation))
    for study_id in image_ids:
        folder = tmp_path / "images" / study_id
        folder.mkdir(parents=True)
        shutil.copy(next((ROOT / "data" / "sample" / "images").glob("*/0.png")), folder / "0.png")
    return tmp_path


def entry(study_id, split="train", **regions):
    report = {k: regions.get(k, "") for k in ALL_REGIONS}
    return {"id": study_id, "report": report, "split": split}


MINIMAL = {"train": [entry("a", lung="Clear.")], "val": [{"id": "b", "original_report": "Normal.", "split": "val"}],
           "test": [entry("c", "test", heart="Normal.")]}


def test_sample_loads_with_every_split_and_sorted_views(sample_studies):
    counts = {s: len(by_split(sample_studies, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 4, "test": 4}
    for study in sample_studies:
        assert 1 <= len(study.image_paths) <= 3
        assert study.image_paths == sorted(study.image_paths)
        if study.split == "val":
            assert study.regions is None and study.original_report
        else:
            assert set(study.regions) == set(ALL_REGIONS)
    views = study_images(sample_studies[0])
    assert all(v.mode == "RGB" for v in views)


@needs_shared
def test_real_annotation_parses_in_full():
    annotation = read_annotation(SHARED_IU_XRAY / "annotation.json")
    studies = [_parse_entry(e, split, i, SHARED_IU_XRAY) for split in ("train", "val", "test")
               for i, e in enumerate(annotation[split])]
    assert [sum(s.split == x for s in studies) for x in ("train", "val", "test")] == [2069, 296, 590]
    assert all(s.regions is None and s.original_report for s in studies if s.split == "val")
    assert all(set(s.regions) == set(ALL_REGIONS) for s in studies if s.split != "val")


def test_missing_image_folder_is_skipped_and_named(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b"])  # 'c' has no images
    with pytest.warns(UserWarning, match=r"1 studies .* skipped: c"):
        studies = load_studies(data)
    assert [s.id for s in studies] == ["a", "b"]
    with pytest.raises(DataError, match="c"):
        load_studies(data, strict=True)


def test_empty_image_folder_counts_as_missing(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b"])
    (data / "images" / "c").mkdir()
    with pytest.warns(UserWarning, match="skipped: c"):
        load_studies(data)


@pytest.mark.parametrize("annotation, message", [
    ('{"train": [', r"invalid JSON at line 1, column \d+"),
    ('[]', "expected an object"),
    (json.dumps({"train": [], "val": []}), "missing split 'test'"),
    (json.dumps({**MINIMAL, "train": [{"report": {}}]}), r": train\[0\]: missing key 'id'$"),
    (json.dumps({**MINIMAL, "train": [{"id": 7, "report": {}}]}), r": train\[0\]: key 'id' must be a non-empty string"),
    (json.dumps({**MINIMAL, "test": [{"id": "c", "split": "test"}]}), r": test\[0\] \(id c\): missing key 'report'"),
    (json.dumps({**MINIMAL, "test": [{"id": "c", "report": "Normal."}]}),
     r": test\[0\] \(id c\): key 'report' must be an object"),
    (json.dumps({**MINIMAL, "val": [{"id": "b", "split": "val"}]}),
     r": val\[0\] \(id b\): missing key 'original_report'"),
    (json.dumps({**MINIMAL, "val": [{"id": "b", "report": entry("b")["report"]}]}),  # a report does not replace it
     r": val\[0\] \(id b\): missing key 'original_report'"),
    (json.dumps({**MINIMAL, "val": [{"id": "b", "original_report": ["Normal."]}]}),
     r": val\[0\] \(id b\): key 'original_report' must be a string"),
    (json.dumps({**MINIMAL, "train": [entry("a"), {"id": "d", "report": {"lung": "x"}}]}),
     r": train\[1\] \(id d\): 'report' is missing region key\(s\) \['heart', 'mediastinal', 'bone', 'others'\]"),
    (json.dumps({**MINIMAL, "test": [entry("c", "test") | {"report": entry("c")["report"] | {"bone": None}}]}),
     r": test\[0\] \(id c\): 'report' region key\(s\) \['bone'\] must be strings"),
    (json.dumps({**MINIMAL, "train": [entry("a"), entry("a")]}), r": train\[1\]: duplicate study id a"),
])
def test_malformed_annotation_names_file_split_index_id_and_key(tmp_path, annotation, message):
    data = make_data(tmp_path, annotation, [])
    for read in (load_studies, lambda d: read_annotation(d / "annotation.json")):
        with pytest.raises(DataError, match=message) as error:
            read(data)
        assert str(error.value).startswith(str(data / "annotation.json"))


def test_read_annotation_checks_every_split_and_entry(tmp_path):
    annotation = {**MINIMAL, "test": [entry("c", "test"), entry("e", "test"), {"id": "f", "report": {}}]}
    data = make_data(tmp_path, annotation, [])
    with pytest.raises(DataError, match=r"annotation.json: test\[2\] \(id f\): 'report' is missing region key"):
        read_annotation(data / "annotation.json")


def test_problem_in_the_users_file_is_named_there_not_in_the_derived_one(tmp_path):
    broken = json.loads(json.dumps(MINIMAL))
    del broken["test"][0]["report"]["heart"]
    data = make_data(tmp_path, broken, ["a", "b", "c"])
    derived = tmp_path / "annotation_with_val.json"
    atomic_write_json(derived, broken)
    with pytest.raises(DataError, match=r"missing region key\(s\) \['heart'\]") as error:
        load_studies(data, annotation_path=derived)
    assert str(error.value).startswith(f"{data / 'annotation.json'}: test[0] (id c)")


def test_no_images_for_a_required_split_is_an_error_naming_where_they_belong(tmp_path):
    data = make_data(tmp_path, MINIMAL, [])
    with pytest.raises(DataError) as error:
        load_studies(data, require_images="train")
    assert str(error.value) == (
        f"{data / 'images'}: none of the 1 train studies has images (3 of the 3 studies in {data / 'annotation.json'} "
        f"lack them); expected <DATA_DIR>/images/<id>/*.{{png,jpg,jpeg,dcm}}, "
        f"e.g. {data / 'images' / 'a'}/*.{{png,jpg,jpeg,dcm}}; {data / 'images'} is missing or empty")


def test_a_nested_images_folder_is_shown_when_no_study_has_images(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["images/a"])  # unzipped one level too deep
    views = r"/\*\.\{png,jpg,jpeg,dcm\}"
    with pytest.raises(DataError, match=rf"none of the 1 val / 1 test studies has images .* e\.g\. .*images/b{views} "
                                        rf"or .*images/c{views}; .*images holds e\.g\. images$"):
        load_studies(data, require_images=("val", "test"))


def test_required_splits_with_images_load_and_still_warn_about_the_rest(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a"])
    with pytest.warns(UserWarning, match=r"2 studies .* skipped: b, c"):
        assert [s.id for s in load_studies(data, require_images="train")] == ["a"]
    with pytest.raises(DataError, match=r"none of the 1 test studies has images \(2 of the 3"):
        load_studies(data, require_images=("train", "test"))


def test_corrupt_png_is_reported_with_file_and_study(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b", "c"])
    (data / "images" / "b" / "0.png").write_bytes(b"not a png")
    studies = load_studies(data)
    bad = next(s for s in studies if s.id == "b")
    with pytest.raises(DataError, match=r"b/0.png: study b: not an image \(neither PNG, JPEG nor DICOM\)"):
        study_images(bad)
    with pytest.warns(UserWarning, match=r"1 studies skipped for unreadable images"):
        assert [s.id for s in readable_studies(studies)] == ["a", "c"]
    with pytest.raises(DataError, match=r"none of the 1 studies has readable images, e.g.:\n  .*b/0.png: study b"):
        readable_studies([bad])
    assert readable_studies([]) == []


RAMP_16_BIT = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit level once


def test_16_bit_grayscale_is_scaled_by_bit_depth_and_8_bit_opens_as_before(tmp_path, monkeypatch):
    Image.fromarray(RAMP_16_BIT).save(tmp_path / "16.png")
    expected = np.round(RAMP_16_BIT / 257)  # value * 255 / 65535
    # as Pillow 13 opens it (I;16), then as older Pillow did (I, read as big-endian 16-bit)
    for png_16_bit_mode in ("I;16", "I"):
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), (png_16_bit_mode, "I;16B"))
        with Image.open(tmp_path / "16.png") as image:
            assert image.mode == png_16_bit_mode
        rgb = np.asarray(open_image(tmp_path / "16.png", "s"))
        assert (rgb == rgb[..., :1]).all() and np.array_equal(rgb[..., 0], expected)
        assert rgb[..., 0].flat[[0, 32768, 65535]].tolist() == [0, 128, 255]  # min, middle, max of the ramp
        assert (rgb == 255).mean() < 0.01  # PIL's convert("RGB") clips 99.6% of the ramp to white
    ramp_8_bit = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for image in (Image.fromarray(ramp_8_bit), Image.fromarray(np.dstack([ramp_8_bit] * 3)),
                  Image.fromarray(ramp_8_bit).convert("P")):
        image.save(tmp_path / f"{image.mode}.png")
        with Image.open(tmp_path / f"{image.mode}.png") as reread:
            assert np.array_equal(np.asarray(open_image(tmp_path / f"{image.mode}.png", "s")),
                                  np.asarray(reread.convert("RGB")))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_deep_images_without_a_known_range_are_refused(tmp_path, mode):
    path = tmp_path / "0.tif"
    Image.fromarray(RAMP_16_BIT).convert(mode).save(path)
    with pytest.raises(DataError, match=rf"0.tif: study s: cannot scale a TIFF image of mode {mode} to 8 bits"):
        open_image(path, "s")


def test_jpeg_views_load_in_natural_file_name_order(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b", "c"])
    folder = data / "images" / "a"
    with Image.open(folder / "0.png") as png:
        view = png.convert("RGB")
    (folder / "0.png").unlink()
    for name in ("0.jpg", "1.JPEG", "2.png", "9.png", "10.png"):
        view.save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    study = next(s for s in load_studies(data) if s.id == "a")
    assert [p.name for p in study.image_paths] == ["0.jpg", "1.JPEG", "2.png", "9.png", "10.png"]
    views = study_images(study)
    assert len(views) == 5 and all(v.mode == "RGB" and v.size == view.size for v in views)


def test_other_files_in_study_folders_are_counted_in_one_warning_and_not_loaded(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b"])
    images = data / "images"
    for name in ("notes.txt", "0.tif", ".DS_Store", "._0.png"):  # ._0.png: a macOS resource fork, not an image
        (images / "a" / name).write_bytes(b"not a view")
    (images / "a" / "lateral").mkdir()
    (images / "c").mkdir()
    (images / "c" / "0.tif").write_bytes(b"TIFF")  # only a TIFF file: the study has no views
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        studies = load_studies(data)
    ignored = [str(w.message) for w in caught if "ignored" in str(w.message)]
    assert len(ignored) == 1 and ignored[0].startswith(f"{images}: 6 files or folders in study folders are not views")
    assert ignored[0].endswith(f"e.g. {images / 'a' / '0.tif'}, {images / 'a' / '.DS_Store'}, "
                               f"{images / 'a' / '._0.png'}")
    assert any("skipped: c" in str(w.message) for w in caught)
    assert {s.id: [p.name for p in s.image_paths] for s in studies} == {"a": ["0.png"], "b": ["0.png"]}


def test_annotation_with_val_regions_is_accepted(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b", "c"])
    with_val = json.loads(json.dumps(MINIMAL))
    with_val["val"][0]["report"] = {k: "" for k in ALL_REGIONS} | {"lung": "Clear."}
    atomic_write_json(tmp_path / "with_val.json", with_val)
    val = by_split(load_studies(data, annotation_path=tmp_path / "with_val.json"), "val")[0]
    assert val.regions["lung"] == "Clear." and val.original_report == "Normal."


def test_jsonl_store_resumes_after_a_torn_line_without_duplicates(tmp_path):
    path = tmp_path / "cache.jsonl"
    store = JsonlStore(path, "id")
    store.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    with open(path, "a") as f:
        f.write('{"id": "c", "v"')  # a kill in the middle of a write
    reopened = JsonlStore(path, "id")
    assert reopened.torn_lines == 1 and sorted(reopened.records) == ["a", "b"]
    reopened.append([{"id": "b", "v": 99}, {"id": "c", "v": 3}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b", "c"] and lines[1]["v"] == 2


def test_notebooks_are_committed_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for path in notebooks:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name


def test_every_notebook_has_a_parameters_cell_first():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert "parameters" in code[0].get("metadata", {}).get("tags", []), path.name
        assert "PROFILE = None" in "".join(code[0]["source"]), path.name  # the settings pick it from the GPU
