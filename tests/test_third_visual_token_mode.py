"""`make demo VISUAL_TOKENS=...`'s steps that depend on the mode, in the third visual-token mode (test_demo.py runs
the notebooks in the other two): training then generation on the smallest case, the smoke's studies, through the
notebooks' commands in this process. A file of its own, so that the second pytest worker takes it while the first
runs the demo chain."""
from test_demo import SMALLEST_CASE_MODE, check_run

from helpers import commands
from helpers.train import training
from helpers.preflight import smoke


def test_the_third_visual_token_mode_trains_and_generates(tmp_path):
    """No run name: training names the run "<model>-<preset>" and generation finds it as the only trained run."""
    mode = SMALLEST_CASE_MODE
    common = ["--smoke", "--profile", "demo", "--artifacts-dir", str(tmp_path)]
    assert commands.main(["train", *common, "--visual-tokens", mode]) == 0
    assert commands.main(["generate", *common]) == 0
    run = smoke.Artifacts(tmp_path, True).find_run()
    assert run.name == smoke.run_name(training.default_run_name("tiny-llava", "two_stage"), True)
    check_run(run, mode, "two_stage", attention_studies=1)
