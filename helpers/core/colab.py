"""The Colab start: the repository's address, the pinned stack installed into the running runtime, and whether the
runtime must restart for it.

Standard library only: each notebook's setup cell imports it right after cloning, before anything is installed.
"""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from importlib import metadata

# The setup cells clone the repository before they can import this, so they and the README's Colab badges repeat the
# address; tests/test_colab.py checks that they all agree with this one.
REPO_URL = "https://github.com/xray-rrg/xray-rrg"
# green-score 0.0.12 pins Python ==3.12.1, torch 2.2.2 and transformers 4.40: installed without its dependencies
# (the few it imports are in requirements.txt)
GREEN_SCORE = ["--no-deps", "--ignore-requires-python", "green-score==0.0.12"]
# radeval 2.2.1 requires torchvision and stanza, medspacy 1.3.1 pins spacy<3.8 on Python 3.11: without their
# dependencies too (what notebook 04's clinical metrics import is in requirements.txt)
RADEVAL = ["--no-deps", "radeval==2.2.1", "medspacy==1.3.1"]


class RestartRequired(RuntimeError):
    """pip replaced packages this runtime had already imported: the old versions stay loaded until a restart."""


def imported_distributions() -> dict[str, str]:
    """{distribution: version} of the installed distributions that have a module imported in this process."""
    loaded = {module.__file__ for module in list(sys.modules.values()) if getattr(module, "__file__", None)}
    owners = metadata.packages_distributions()  # top-level name -> distributions (several for namespace packages)
    candidates = {d for name in {m.partition(".")[0] for m in list(sys.modules)} for d in owners.get(name, ())}
    versions = {}
    for name in candidates:
        dist = metadata.distribution(name)
        if any(str(dist.locate_file(f)) in loaded for f in dist.files or ()):
            versions[dist.metadata["Name"]] = dist.version
    return versions


def changed_versions(before: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{distribution: (version before, version now)} for those of `before` that pip changed or removed."""
    importlib.invalidate_caches()
    changed = {}
    for name, old in before.items():
        try:
            now = metadata.version(name)
        except metadata.PackageNotFoundError:
            now = "removed"
        if now != old:
            changed[name] = (old, now)
    return changed


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def install(repo: str, green_score: bool = False) -> None:
    """Install `repo`'s requirements.txt (and green-score and radeval for notebook 04) into this runtime; raise RestartRequired
    when that changed the version of a package already imported, since the old one stays loaded until a restart."""
    before = imported_distributions()
    print("installing the pinned stack (requirements.txt)" + (" with green-score and radeval" if green_score else "")
          + " ...")
    _pip("-r", f"{repo}/requirements.txt")
    if green_score:
        _pip(*GREEN_SCORE)
        _pip(*RADEVAL)
    changed = changed_versions(before)
    if changed:
        raise RestartRequired("Restart the runtime (Runtime > Restart session), then run this notebook again: pip "
                              "changed packages this runtime had already imported: " +
                              ", ".join(f"{name} {old} -> {now}" for name, (old, now) in sorted(changed.items())))
    print("installed; no restart needed (no package this runtime had imported changed version)")


def ensure_java() -> None:
    """A headless JRE for METEOR (pycocoevalcap runs it in Java), installed only when `java` is absent."""
    if shutil.which("java") is None:
        print("installing a headless Java runtime for METEOR (apt-get, about a minute) ...")
        subprocess.run(["apt-get", "install", "-y", "-qq", "default-jre-headless"], check=True)
