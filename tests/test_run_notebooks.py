"""`python -m helpers.run_notebooks` as a user types it: --help, one notebook, a parameter, a quiet kernel."""
import os
import shutil
import subprocess
import sys

import nbformat
from conftest import ROOT


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "helpers.run_notebooks", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_names_the_options(tmp_path):
    done = run("--help", cwd=tmp_path)
    assert done.returncode == 0 and all(option in done.stdout for option in ("--profile", "--out", "-p NAME VALUE"))


def test_one_notebook_with_a_data_dir_parameter(tmp_path, sample_dir):
    data_dir = shutil.copytree(sample_dir, tmp_path / "my data")
    done = run("--out", str(tmp_path / "out"), "-p", "DATA_DIR", str(data_dir), "01_region_prompting.ipynb",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "01_region_prompting.ipynb" in done.stdout and "ok in" in done.stdout
    assert "without encryption" not in done.stderr  # the kernel talks over Unix sockets, not TCP
    outputs = "".join(o.get("text", "") for c in nbformat.read(tmp_path / "out" / "executed" /
                                                              "01_region_prompting.ipynb", as_version=4).cells
                      for o in c.get("outputs", []))
    assert f"data_dir: {data_dir}" in outputs
    assert (tmp_path / "out" / "regions" / "val_regions.json").is_file()
