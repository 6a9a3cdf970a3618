"""Execute the notebooks headlessly, in order.

    python -m python -m helpers.run_notebooks --profile demo --out artifacts/demo [-p NAME VALUE ...] [NOTEBOOK ...]

Without notebook names it runs the demo chain (`DEMO_STEPS`): 01, then 02 and 03 once per preset of `DEMO_RUNS`,
then 04, which compares the runs; with `-p SMOKE True` the smoke chain (`SMOKE_STEPS`: 02 and 03 for the first run
only). Each `-p` parameter goes to the notebooks whose parameters cell declares it (as papermill's own -p does), over
the chain's own.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import papermill
from traitlets.config import Config

from .commands import parameter_value

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# two presets, so notebook 04 compares two runs: the preference stage's run with its SFT counterpart
DEMO_RUNS = {"demo-two_stage": "two_stage", "demo-two_stage_dpo": "two_stage_dpo"}


def chain(runs: dict[str, str]) -> list[tuple[str, dict]]:
    """01, then 02 and 03 for each run {name: preset}, then 04."""
    return [("01_region_prompting.ipynb", {}),
            *[("02_sft_lora_qlora.ipynb", {"RUN_NAME": run, "PRESET": preset}) for run, preset in runs.items()],
            *[("03_generate.ipynb", {"RUN_NAME": run}) for run in runs],
            ("04_green_eval.ipynb", {})]


DEMO_STEPS = chain(DEMO_RUNS)
SMOKE_STEPS = chain(dict(list(DEMO_RUNS.items())[1:]))  # a smoke checks the code path once: two_stage_dpo's three stages


def declared_parameters(name: str) -> set[str]:
    return set(papermill.inspect_notebook(str(NOTEBOOKS_DIR / name)))


def run_notebook(name: str, artifacts_dir: str | Path, profile: str = "demo", **parameters) -> Path:
    """Run one notebook with working directory notebooks/; the executed copy goes to `artifacts_dir/executed/`,
    named after the run when RUN_NAME is given, and "-smoke" for a smoke run."""
    artifacts_dir = Path(artifacts_dir).resolve()
    suffix = "".join(f"-{part}" for part in (parameters.get("RUN_NAME"), parameters.get("SMOKE") and "smoke") if part)
    executed = artifacts_dir / "executed" / name.replace(".ipynb", f"{suffix}.ipynb")
    executed.parent.mkdir(parents=True, exist_ok=True)
    # the kernel talks over Unix sockets in a private folder: nothing listens on a TCP port (ipykernel warns if so)
    with tempfile.TemporaryDirectory() as sockets:
        papermill.execute_notebook(str(NOTEBOOKS_DIR / name), str(executed), cwd=str(NOTEBOOKS_DIR),
                                   parameters={"PROFILE": profile, "ARTIFACTS_DIR": str(artifacts_dir), **parameters},
                                   kernel_name="python3", progress_bar=False, log_output=False,
                                   config=Config(KernelManager={"transport": "ipc", "ip": f"{sockets}/kernel"}))
    return executed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", help="PROFILE of every notebook (default: demo)")
    parser.add_argument("--out", default="artifacts/demo", help="ARTIFACTS_DIR (default: artifacts/demo)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter, e.g. -p VISUAL_TOKENS tile (repeatable)")
    parser.add_argument("notebooks", nargs="*", help="names to run (default: all, in order)")
    args = parser.parse_args(argv)
    parameters = {name: parameter_value(value) for name, value in args.parameter}
    steps = [(name, {}) for name in args.notebooks] or (SMOKE_STEPS if parameters.get("SMOKE") else DEMO_STEPS)
    declared = {name: declared_parameters(name) for name, _ in steps}
    unknown = set(parameters) - set().union(*declared.values())
    if unknown:
        parser.error(f"no notebook among {sorted(declared)} has the parameter(s) {sorted(unknown)}")
    for name, own in steps:
        start = time.time()
        given = {k: v for k, v in parameters.items() if k in declared[name]}
        executed = run_notebook(name, args.out, args.profile, **{**own, **given})
        print(f"{name} {own or ''}: ok in {time.time() - start:.0f}s -> {executed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
