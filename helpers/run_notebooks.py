"""Execute the notebooks headlessly, in order: `python -m helpers.run_notebooks --profile demo --out artifacts/demo`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, artifacts_dir: str | Path, profile: str = "demo", **parameters) -> Path:
    """Run one notebook with working directory notebooks/; the executed copy goes to `artifacts_dir/executed/`."""
    import papermill

    artifacts_dir = Path(artifacts_dir).resolve()
    executed = artifacts_dir / "executed" / name
    executed.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(NOTEBOOKS_DIR / name), str(executed), cwd=str(NOTEBOOKS_DIR),
                               parameters={"PROFILE": profile, "ARTIFACTS_DIR": str(artifacts_dir), **parameters},
                               kernel_name="python3", progress_bar=False, log_output=False)
    return executed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--out", default="artifacts/demo")
    parser.add_argument("notebooks", nargs="*", help="names to run (default: all, in order)")
    args = parser.parse_args()
    names = args.notebooks or sorted(p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    for name in names:
        start = time.time()
        executed = run_notebook(name, args.out, args.profile)
        print(f"{name}: ok in {time.time() - start:.0f}s -> {executed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
