"""`make gpu-check` in its dry run: every part on the CPU at tiny widths, one JSON with the expected records."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def gpu_check(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "helpers.gpu_check", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=timeout)


def positive(record, *fields):
    return all(isinstance(record[f], (int, float)) and record[f] > 0 for f in fields)


def test_dry_run_measures_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = gpu_check("--dry-run", "--out", str(out))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["device"]["transformers"]

    measured = result["train"]
    assert {(r["visual_tokens"], r["views_per_study"]) for r in measured} == {(m, v) for m in ("tile", "base")
                                                                              for v in (1, 2, 3)}
    for r in measured:
        assert positive(r, "seconds_per_step", "image_tokens_per_study", "text_tokens_per_study_approx")
        assert r["load_in_4bit"] and r["measured_steps"] > 0 and r["peak_memory_gib"] is None  # no GPU here
        # the real geometry: 1,176 tokens per square view with one 336 tile, 576 with the base tile alone
        assert r["image_tokens_per_study"] == {"tile": 1176, "base": 576}[r["visual_tokens"]] * r["views_per_study"]

    assert {(r["load_in_4bit"], r["batch_size"]) for r in result["generate"]} == {(q, b) for q in (True, False)
                                                                                 for b in (1, 2)}
    assert all(positive(r, "studies_per_s", "generated_tokens_per_s", "generated_tokens_per_study")
               for r in result["generate"])

    ours, shipped = result["judge"]
    assert (ours["loop"], shipped["loop"]) == ("helpers.judge.Judge", "green_score.green.GREEN")
    assert ours["new_tokens_per_pair"] == shipped["new_tokens_per_pair"] > 0
    assert ours["same_responses"] and positive(ours, "seconds_per_pair", "generated_tokens_max")
    assert positive(shipped, "seconds_per_pair")


def test_problems_names_missing_and_non_positive_fields():
    from helpers.gpu_check import problems

    result = {"dry_run": False, "train": [{"visual_tokens": "tile", "views_per_study": 1, "image_tokens_per_study": 576,
                                           "seconds_per_step": 0.0, "peak_memory_gib": None},
                                          ], "judge": []}
    assert problems(result) == ["train[0].seconds_per_step = 0.0", "train[0].peak_memory_gib = None",
                                "judge: no records"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_refuses_to_measure_without_a_gpu(tmp_path):
    run = gpu_check("--out", str(tmp_path / "out.json"), timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr and not (tmp_path / "out.json").exists()
