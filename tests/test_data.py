import json
import shutil

import pytest
from conftest import ROOT, SHARED_IU_XRAY, needs_shared

import helpers
from helpers.data import DataError
from helpers.storage import JsonlStore, atomic_write_json


def make_data(tmp_path, annotation, image_ids):
    (tmp_path / "annotation.json").write_text(annotation if isinstance(annotation, str) else json.dumps(annotation))
    for study_id in image_ids:
        folder = tmp_path / "images" / study_id
        folder.mkdir(parents=True)
        shutil.copy(next((ROOT / "data" / "sample" / "images").glob("*/0.png")), folder / "0.png")
    return tmp_path


def entry(study_id, split="train", **regions):
    report = {k: regions.get(k, "") for k in helpers.ALL_REGIONS}
    return {"id": study_id, "report": report, "split": split}


MINIMAL = {"train": [entry("a", lung="Clear.")], "val": [{"id": "b", "original_report": "Normal.", "split": "val"}],
           "test": [entry("c", "test", heart="Normal.")]}


def test_sample_loads_with_every_split_and_sorted_views(sample_studies):
    counts = {s: len(helpers.by_split(sample_studies, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 4, "test": 4}
    for study in sample_studies:
        assert 1 <= len(study.image_paths) <= 3
        assert study.image_paths == sorted(study.image_paths)
        if study.split == "val":
            assert study.regions is None and study.original_report
        else:
            assert set(study.regions) == set(helpers.ALL_REGIONS)
    views = helpers.study_images(sample_studies[0])
    assert all(v.mode == "RGB" for v in views)


@needs_shared
def test_real_annotation_parses_in_full():
    annotation = helpers.data.read_annotation(SHARED_IU_XRAY / "annotation.json")
    studies = [helpers.data._parse_entry(e, split, i, SHARED_IU_XRAY) for split in ("train", "val", "test")
               for i, e in enumerate(annotation[split])]
    assert [sum(s.split == x for s in studies) for x in ("train", "val", "test")] == [2069, 296, 590]
    assert all(s.regions is None and s.original_report for s in studies if s.split == "val")
    assert all(set(s.regions) == set(helpers.ALL_REGIONS) for s in studies if s.split != "val")


def test_missing_image_folder_is_skipped_and_named(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b"])  # 'c' has no images
    with pytest.warns(UserWarning, match=r"1 studies .* skipped: c"):
        studies = helpers.load_studies(data)
    assert [s.id for s in studies] == ["a", "b"]
    with pytest.raises(DataError, match="c"):
        helpers.load_studies(data, strict=True)


def test_empty_image_folder_counts_as_missing(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b"])
    (data / "images" / "c").mkdir()
    with pytest.warns(UserWarning, match="skipped: c"):
        helpers.load_studies(data)


@pytest.mark.parametrize("annotation, message", [
    ('{"train": [', r"invalid JSON at line 1, column \d+"),
    ('[]', "expected an object"),
    (json.dumps({"train": [], "val": []}), "missing split 'test'"),
    (json.dumps({**MINIMAL, "train": [{"report": {}}]}), r"train\[0\]: missing key 'id'"),
    (json.dumps({**MINIMAL, "test": [{"id": "c", "split": "test"}]}), r"test\[0\] \(id c\): missing key 'report'"),
    (json.dumps({**MINIMAL, "train": [{"id": "a", "report": {"lung": "x"}}]}), r"id a.*missing region key"),
    (json.dumps({**MINIMAL, "train": [entry("a"), entry("a")]}), "duplicate study id a"),
])
def test_malformed_annotation_names_file_and_problem(tmp_path, annotation, message):
    data = make_data(tmp_path, annotation, [])
    with pytest.raises(DataError, match=message) as error:
        helpers.load_studies(data)
    assert str(data / "annotation.json") in str(error.value)


def test_corrupt_png_is_reported_with_file_and_study(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b", "c"])
    (data / "images" / "b" / "0.png").write_bytes(b"not a png")
    studies = helpers.load_studies(data)
    bad = next(s for s in studies if s.id == "b")
    with pytest.raises(DataError, match=r"b/0.png: study b: cannot read image"):
        helpers.study_images(bad)
    with pytest.warns(UserWarning, match=r"1 studies skipped for unreadable images"):
        assert [s.id for s in helpers.readable_studies(studies)] == ["a", "c"]


def test_annotation_with_val_regions_is_accepted(tmp_path):
    data = make_data(tmp_path, MINIMAL, ["a", "b", "c"])
    with_val = json.loads(json.dumps(MINIMAL))
    with_val["val"][0]["report"] = {k: "" for k in helpers.ALL_REGIONS} | {"lung": "Clear."}
    atomic_write_json(tmp_path / "with_val.json", with_val)
    val = helpers.by_split(helpers.load_studies(data, annotation_path=tmp_path / "with_val.json"), "val")[0]
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
