import json

import nbformat
from conftest import ROOT

from helpers import data
from helpers.run_notebooks import run_notebook

NOTEBOOK = "01_region_prompting.ipynb"


def test_notebook01_runs_in_demo_and_writes_the_split_validation_set(tmp_path, sample_dir):
    executed = run_notebook(NOTEBOOK, tmp_path)
    regions_dir = tmp_path / "regions"
    val_ids = [e["id"] for e in json.loads((sample_dir / "annotation.json").read_text())["val"]]

    val_regions = json.loads((regions_dir / "val_regions.json").read_text())
    assert list(val_regions) == val_ids
    assert all(list(r) == list(data.ALL_REGIONS) for r in val_regions.values())
    assert val_regions[val_ids[0]]["heart"] == "Heart is unremarkable."  # the rules backend ran on the real text

    studies = data.load_studies(sample_dir, annotation_path=regions_dir / "annotation_with_val.json")
    val = [s for s in studies if s.split == "val"]
    assert len(val) == 4 and all(s.regions == val_regions[s.id] and s.original_report for s in val)

    outputs = "".join(o.get("text", "") + json.dumps(o.get("data", {}))
                      for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", []))
    assert "backend=rules" in outputs and "4 split (0 from cache, 4 new), 0 failed" in outputs

    # a rerun is served from the cache, which gains no duplicate line
    executed = run_notebook(NOTEBOOK, tmp_path)
    outputs = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells
                      for o in c.get("outputs", []))
    assert "4 split (4 from cache, 0 new), 0 failed" in outputs
    assert len((regions_dir / "cache.jsonl").read_text().splitlines()) == 4


def test_notebook01_is_committed_clean_with_parameters_first():
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "parameters" in nb.cells[1].metadata.get("tags", [])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
