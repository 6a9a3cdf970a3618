"""The Colab start: one repository address, the setup cell's pull, install and fresh import, and the restart check."""
import json
import re
import subprocess
import sys
from importlib import metadata

import nbformat
import pytest
from conftest import ROOT

from helpers.core import colab
from helpers.run_notebooks import NOTEBOOKS_DIR

NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def setup_cell(name: str) -> str:
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source)


def test_the_setup_cells_and_the_badges_use_the_one_address():
    owner_name = colab.REPO_URL.removeprefix("https://github.com/")
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", code)) == {colab.REPO_URL}, name
        assert "REPO_URL" not in nb.cells[1].source, f"{name}: the address is not a notebook parameter"
    readme = (ROOT / "README.md").read_text()
    badges = re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/([\w.-]+)", readme)
    assert sorted(badges) == [(owner_name, name) for name in NOTEBOOKS]


@pytest.mark.parametrize("cloned", [True, False])
def test_the_setup_cell_on_colab_pulls_installs_and_imports_helpers_afresh(tmp_path, cloned):
    """The Colab branch of notebook 04's setup cell, in a fresh interpreter with a stand-in google.colab and git and
    pip recorded instead of run."""
    repo = tmp_path / "xray-rrg"
    if cloned:
        repo.mkdir()
    bootstrap = setup_cell("04_green_eval.ipynb").split("\nfrom helpers")[0].replace("/content/xray-rrg",
                                                                                            str(repo))
    script = f"""
import json, subprocess, sys, types
sys.modules["google.colab"] = types.ModuleType("google.colab")
sys.path.insert(0, {str(ROOT)!r})  # stands for the clone, which git does not really make here
import helpers.core.colab as before
commands = []
subprocess.run = lambda command, check: commands.append(command)
exec({bootstrap!r})
import helpers.core.colab
print(json.dumps({{"commands": commands, "fresh": helpers.core.colab is not before, "path": sys.path[0]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    git = ["git", "-C", str(repo), "pull", "-q"] if cloned else ["git", "clone", "-q", colab.REPO_URL, str(repo)]
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    assert result["commands"] == [git, pip + ["-r", f"{repo}/requirements.txt"], pip + colab.GREEN_SCORE,
                                  pip + colab.RADEVAL]
    assert result["fresh"] and result["path"] == str(repo)  # helpers imported again, from the clone
    assert printed[-1].startswith("installed; no restart needed")  # pip did nothing here


def test_a_restart_is_asked_for_only_when_an_imported_package_changed(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(colab, "_pip", lambda *args: calls.append(args))
    tqdm = metadata.version("tqdm")
    monkeypatch.setattr(colab, "imported_distributions", lambda: {"tqdm": tqdm})
    colab.install("/repo")
    assert calls == [("-r", "/repo/requirements.txt")] and "no restart needed" in capsys.readouterr().out
    monkeypatch.setattr(colab, "imported_distributions", lambda: {"tqdm": "4.0.0", "gone-dist": "1.0"})
    with pytest.raises(colab.RestartRequired, match=rf"Restart the runtime.*gone-dist 1.0 -> removed, tqdm 4.0.0 -> {tqdm}"):
        colab.install("/repo", green_score=True)
    assert calls[-2:] == [tuple(colab.GREEN_SCORE), tuple(colab.RADEVAL)]


def test_colab_installs_the_packages_make_venv_installs_without_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    for packages in (colab.GREEN_SCORE, colab.RADEVAL):
        assert "pip install " + " ".join(packages) in makefile


def test_imported_distributions_are_those_with_a_module_loaded():
    script = ("import json, helpers.core.colab as c; first = c.imported_distributions(); import tqdm; "
              "print(json.dumps([first, c.imported_distributions()]))")
    first, then = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                            cwd=ROOT, check=True).stdout)
    assert not {"torch", "transformers", "tqdm"} & set(first)  # `import helpers` imports none of the stack
    assert then["tqdm"] == metadata.version("tqdm") and set(then) - set(first) == {"tqdm"}
