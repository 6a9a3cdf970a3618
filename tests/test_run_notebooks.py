"""`python -m helpers.run_notebooks` as a user types it: --help, one notebook (01) with a parameter, a quiet kernel,
the notebook's outputs; then the same notebook again, served from its cache."""
import json
import os
import shutil
import subprocess
import sys

import nbformat
from conftest import ROOT

from helpers.core import data
from helpers.run_notebooks import run_notebook

NOTEBOOK = "01_region_prompting.ipynb"


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "helpers.run_notebooks", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def printed(executed) -> str:
    return "".join(o.get("text", "") + json.dumps(o.get("data", {}))
                   for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", []))


def test_help_names_the_options(tmp_path):
    done = run("--help", cwd=tmp_path)
    assert done.returncode == 0 and all(option in done.stdout for option in ("--profile", "--out", "-p NAME VALUE"))


def test_notebook01_with_a_data_dir_writes_the_split_validation_set_and_reruns_from_its_cache(tmp_path, sample_dir):
    data_dir, out = shutil.copytree(sample_dir, tmp_path / "my data"), tmp_path / "out"
    done = run("--out", str(out), "-p", "DATA_DIR", str(data_dir), NOTEBOOK, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert NOTEBOOK in done.stdout and "ok in" in done.stdout
    assert "without encryption" not in done.stderr  # the kernel talks over Unix sockets, not TCP
    outputs = printed(out / "executed" / NOTEBOOK)
    assert f"data_dir: {data_dir}" in outputs
    assert "backend=rules" in outputs and "4 split (0 from cache, 4 new), 0 failed" in outputs

    regions_dir = out / "regions"
    val_ids = [e["id"] for e in json.loads((data_dir / "annotation.json").read_text())["val"]]
    val_regions = json.loads((regions_dir / "val_regions.json").read_text())
    assert list(val_regions) == val_ids
    assert all(list(r) == list(data.ALL_REGIONS) for r in val_regions.values())
    assert val_regions[val_ids[0]]["heart"] == "Heart is unremarkable."  # the rules backend ran on the real text
    studies = data.load_studies(data_dir, annotation_path=regions_dir / "annotation_with_val.json")
    val = [s for s in studies if s.split == "val"]
    assert len(val) == 4 and all(s.regions == val_regions[s.id] and s.original_report for s in val)

    # a rerun is served from the cache, which gains no duplicate line
    assert "4 split (4 from cache, 0 new), 0 failed" in printed(run_notebook(NOTEBOOK, out, DATA_DIR=str(data_dir)))
    assert len((regions_dir / "cache.jsonl").read_text().splitlines()) == 4
