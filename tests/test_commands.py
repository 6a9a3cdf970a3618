"""`python -m helpers STEP`: the notebooks' parameters as options, and the steps on 2 CPU processes (torchrun, gloo)
against the sample: DDP training killed and resumed, sharded generation equal to one process's, a killed generation
resumed, sharded judging."""
import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from helpers import commands
from helpers.core import storage
from helpers.demo import tiny_models
from helpers.evaluate import grounding
from helpers.judge.servers import free_port
from helpers.core.runs import SPLIT_NAMES, Artifacts

from conftest import ROOT
from tiny_run import make_run

# Both sides of every comparison run with one BLAS thread per process: CPU matmuls then add in the same order, so
# greedy decoding of the random-weight model cannot flip on a float near-tie (torchrun gives each worker one thread).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def helpers_command(step, artifacts, *options, processes=1, **popen):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "helpers", step, "--profile", "demo", "--artifacts-dir", str(artifacts), *options]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def kill_when(process, ready, what: str):
    """Kill the launcher and every worker (like a lost node) as soon as `ready()`; fail if the run ends first."""
    deadline = time.time() + 300
    while not ready():
        assert process.poll() is None and time.time() < deadline, f"never saw {what}: " + process.communicate()[0][-4000:]
        time.sleep(0.02)
    launcher = psutil.Process(process.pid)
    members = [*launcher.children(recursive=True), launcher]
    for member in members:
        member.kill()
    psutil.wait_procs(members, timeout=30)
    process.communicate()


def run_helpers(step, artifacts, *options, processes=1):
    process = helpers_command(step, artifacts, *options, processes=processes)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def test_help_lists_the_four_steps_and_every_notebook_parameter():
    out = subprocess.run([sys.executable, "-m", "helpers", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, check=True).stdout
    assert all(step in out for step in ("split", "train", "generate", "evaluate"))
    parser = commands.build_parser()
    for step in commands.NOTEBOOKS:
        args = vars(parser.parse_args([step]))
        parameters = commands.notebook_parameters(step)
        assert set(args) - {"step"} == set(parameters)  # every notebook parameter, nothing else
        assert {name: args[name] for name in parameters} == {n: p["default"] for n, p in parameters.items()}
    assert commands.notebook_parameters("train")["PRESET"]["default"] == "two_stage"
    assert "--run-name RUN_NAME" in subprocess.run([sys.executable, "-m", "helpers", "train", "--help"], cwd=ROOT,
                                                   env=ENV, capture_output=True, text=True, check=True).stdout


def test_option_values_are_the_notebook_parameters_types():
    parser = commands.build_parser()
    train = vars(parser.parse_args(["train", "--run-name", "123", "--epochs", "2", "--load-in-4bit", "True",
                                    "--holdout-fraction", "0.1", "--model-id", "None"]))
    assert (train["RUN_NAME"], train["EPOCHS"], train["LOAD_IN_4BIT"], train["HOLDOUT_FRACTION"],
            train["MODEL_ID"]) == ("123", 2, True, 0.1, None)
    evaluate = vars(parser.parse_args(["evaluate", "--run-names", "a", "7", "--meteor", "False"]))
    assert (evaluate["RUN_NAMES"], evaluate["METEOR"]) == (["a", "7"], False)
    assert vars(parser.parse_args(["generate", "--attention-layers", "1", "2"]))["ATTENTION_LAYERS"] == [1, 2]
    for step in commands.NOTEBOOKS:  # a True / False parameter alone is True: --smoke is --smoke True
        assert [vars(parser.parse_args([step, *given, "--profile", "demo"]))["SMOKE"]
                for given in ([], ["--smoke"], ["--smoke", "True"], ["--smoke", "False"])] == [False, True, True, False]


def test_open_store_merges_what_a_killed_multi_process_run_left(tmp_path):
    path = tmp_path / "predictions_test.jsonl"
    storage.JsonlStore(path, "id").append([{"id": "a", "text": "1"}])
    storage.JsonlStore(storage.shard_path(path, 0), "id").append([{"id": "b", "text": "2"}, {"id": "a", "text": "x"}])
    storage.JsonlStore(storage.shard_path(path, 1), "id").append([{"id": "c", "text": "3"}])
    store = storage.open_store(path, "id")
    assert [(r["id"], r["text"]) for r in store.records.values()] == [("a", "1"), ("b", "2"), ("c", "3")]
    assert not list(tmp_path.glob("*.process-*"))  # merged shards are gone
    assert storage.open_store(path, "id").records == store.records  # merging again changes nothing


def test_process_device_map_puts_the_whole_model_on_this_process_gpu(monkeypatch):
    """DDP with 4-bit weights needs each process's whole model on its own GPU (TRL's QLoRA multi-GPU recipe)."""
    from types import SimpleNamespace

    from helpers.core import lm

    assert lm.process_device_map() == {"": "cpu"}
    monkeypatch.setattr(lm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lm, "processes", lambda: SimpleNamespace(local_process_index=1))
    assert lm.process_device_map() == {"": 1}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A run trained by `torchrun --nproc_per_node 2 -m helpers train` on the sample (the default two_stage preset,
    whose second stage trains vision LoRA: DDP stops if any trainable parameter gets no gradient), killed (every
    process, like a lost node) as soon as a stage-2 checkpoint is on disk, then run again to the end."""
    artifacts = tmp_path_factory.mktemp("ddp")
    run = Artifacts(artifacts).run("ddp")
    stage2 = run.checkpoints_dir / "2_vision_lora"
    process = helpers_command("train", artifacts, "--run-name", "ddp", processes=2)
    kill_when(process, lambda: any(stage2.glob("checkpoint-*/trainer_state.json")), "a stage-2 checkpoint")
    assert not run.trained
    run_helpers("train", artifacts, "--run-name", "ddp", processes=2)
    return artifacts


# batches of one long report: each takes long enough on the CPU for the kill below to land between two of them; the
# grounding check on 2 test studies, so that each ablation's studies spread over the 2 processes too
GENERATE = ("--run-name", "ddp", "--batch-size", "1", "--max-new-tokens", "200", "--attention-studies", "0",
            "--grounding-studies", "2")


def copy_of_trained(ddp_run, tmp_path):
    """A fresh artifacts folder holding only the trained run and the demo models."""
    source = ddp_run
    for part in ("models", "train"):
        shutil.copytree(source / part, tmp_path / part)
    return tmp_path


def predictions(artifacts):
    """{split or grounding ablation: the predictions file's records in file order}."""
    run = Artifacts(artifacts).run("ddp")
    paths = {**{split: run.predictions(split) for split in SPLIT_NAMES},
             **{ablation: grounding.predictions_path(run, ablation) for ablation in grounding.ABLATIONS}}
    return {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}


def test_two_process_train_finishes_the_run(ddp_run, sample_studies):
    artifacts = ddp_run
    run = Artifacts(artifacts).run("ddp")
    assert run.trained and (run.adapter_dir / "adapter_config.json").is_file()
    metrics = json.loads(run.metrics_path.read_text())
    assert [s["name"] for s in metrics["stages"]] == ["frozen_vision", "vision_lora"]
    assert {s["processes"] for s in metrics["stages"]} == {2}
    config = run.config
    assert config["processes"] == 2
    # each of the 2 processes takes its own half of every step: ceil(n_train / (2 x batch)) steps per epoch
    steps_per_epoch = -(-config["n_train"] // (2 * config["batch_size"] * config["grad_accum"]))
    assert [s["global_step"] for s in metrics["stages"]] == [steps_per_epoch * s["epochs"] for s in config["stages"]]
    assert (run.train_dir / "loss.png").is_file()
    assert "already trained" in run_helpers("train", artifacts, "--run-name", "ddp", processes=2)


def test_killed_two_process_train_resumes_from_its_checkpoint(ddp_run):
    run = Artifacts(ddp_run).run("ddp")
    stage1, stage2 = json.loads(run.metrics_path.read_text())["stages"]
    assert stage1["resumed_from_step"] == 0  # done before the kill, skipped
    assert stage2["resumed_from_step"] in (4, 8) and stage2["global_step"] == 8  # demo: save_steps 4
    assert run.trained


@pytest.fixture(scope="module")
def one_process_predictions(ddp_run, tmp_path_factory):
    artifacts = copy_of_trained(ddp_run, tmp_path_factory.mktemp("one") / "artifacts")
    run_helpers("generate", artifacts, *GENERATE)
    return predictions(artifacts)


def test_two_process_generate_equals_one_process(ddp_run, one_process_predictions, tmp_path, sample_studies):
    artifacts = copy_of_trained(ddp_run, tmp_path / "artifacts")
    run_helpers("generate", artifacts, *GENERATE, processes=2)
    two = predictions(artifacts)
    for split in SPLIT_NAMES:
        ids = [r["id"] for r in two[split]]
        assert sorted(ids) == sorted(s.id for s in sample_studies if s.split == split)  # each study exactly once
    assert all(len(two[ablation]) == 2 for ablation in grounding.ABLATIONS)
    assert two == one_process_predictions  # same records (texts, confidences), in the same order, ablations too
    assert not list((artifacts / "generate" / "ddp").glob("*.process-*"))


def test_killed_two_process_generate_resumes_without_loss_or_duplicates(ddp_run, one_process_predictions, tmp_path):
    artifacts = copy_of_trained(ddp_run, tmp_path / "artifacts")
    generate_dir = artifacts / "generate" / "ddp"
    process = helpers_command("generate", artifacts, *GENERATE, processes=2)
    kill_when(process, lambda: any(p.stat().st_size for p in generate_dir.glob("predictions_val.process-*.jsonl")),
              "a first prediction")
    done = sum(len(p.read_text().splitlines()) for p in generate_dir.glob("*.jsonl"))
    assert 0 < done < sum(len(v) for v in one_process_predictions.values())  # killed part-way
    run_helpers("generate", artifacts, *GENERATE, processes=2)
    resumed = predictions(artifacts)
    for name, records in resumed.items():
        ids = [r["id"] for r in records]
        assert len(ids) == len(set(ids))
        assert {r["id"]: r for r in records} == {r["id"]: r for r in one_process_predictions[name]}
    assert not list(generate_dir.glob("*.process-*"))


def test_two_process_evaluate_equals_one_process(ddp_run, sample_studies, tmp_path, green_judge_dir):
    """The judge's pairs spread over 2 processes: the same judge cache and the same tables as one process. The demo
    judge is the session's build, copied where the command would build the same one (BUILT_NOTE: not built again)."""
    train = [s for s in sample_studies if s.split == "train"]
    outputs = {}
    for processes in (1, 2):
        artifacts = copy_of_trained(ddp_run, tmp_path / f"artifacts{processes}")
        shutil.copytree(green_judge_dir, artifacts / "models" / tiny_models.DEMO_JUDGE_DIR)
        run = Artifacts(artifacts).run("ddp")
        run.generate_dir.mkdir(parents=True)
        for split in SPLIT_NAMES:  # predictions: the reports of train studies, short real text for the judge
            studies = [s for s in sample_studies if s.split == split]
            run.predictions(split).write_text("".join(json.dumps({"id": s.id, "regions": t.regions}) + "\n"
                                                      for s, t in zip(studies, train)))
        if processes == 1:  # the val references, by the split command in this process
            assert commands.main(["split", "--profile", "demo", "--artifacts-dir", str(artifacts)]) == 0
        else:
            shutil.copytree(tmp_path / "artifacts1" / "regions", artifacts / "regions")
        run_helpers("evaluate", artifacts, "--judge-batch-size", "2", "--meteor", "False", "--n-boot", "50",
                    "--clinical", "False", processes=processes)
        cache = [json.loads(line) for line in (artifacts / "eval" / "green_cache.jsonl").read_text().splitlines()]
        # the key hashes the judge's path, which differs between the two folders: records compared without it
        outputs[processes] = {"cache": [{k: v for k, v in r.items() if k not in ("key", "judge", "seconds")}
                                        for r in cache],
                              # the tables name the judge by its path too
                              **{name: (artifacts / "eval" / "compare" / name).read_text().replace(str(artifacts), "")
                                 for name in ("green_compare.csv", "green_stats.csv", "nlg.csv")}}
        assert not list((artifacts / "eval").glob("*.process-*"))
    assert len(outputs[1]["cache"]) > 4  # several batches of 2, so both processes judged some
    assert all(r["n_new_tokens"] > 1 for r in outputs[1]["cache"])  # answers, not a budget-filling prompt
    assert outputs[2] == outputs[1]


# A user error is one line on stderr, `error: ...`, with exit status 2; a bug keeps its traceback (commands.main)

@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory, tiny_model_dir, sample_dir):
    """An artifacts folder holding one trained-looking run, "tiny" (tests/tiny_run.py)."""
    return make_run(tmp_path_factory.mktemp("artifacts"), tiny_model_dir, sample_dir).artifacts_dir


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [stderr.splitlines()[-1]], stderr
    return stderr.splitlines()[-1]


def test_a_run_that_is_not_trained_is_one_line_and_status_2(tiny_trained, sample_dir):
    """The command as a user runs it: `python -m helpers`, its real exit status and stderr."""
    done = subprocess.run([sys.executable, "-m", "helpers", "predict", "--profile", "demo", "--artifacts-dir",
                           str(tiny_trained), "--run-name", "nope", str(sample_dir / "images" / "CXR1209_IM-0142" /
                                                                     "0.png")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert one_line_error(done.stderr) == (f"error: {tiny_trained}: run 'nope' is not trained: train it with notebook "
                                           f"02 (python -m helpers train), or set RUN_NAME to one of ['tiny']")


def test_an_image_that_is_not_an_image_is_one_line_and_status_2(tiny_trained, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert commands.main(["predict", "--profile", "demo", "--artifacts-dir", str(tiny_trained), "--run-name", "tiny",
                          str(tmp_path / "notes.png")]) == 2
    assert one_line_error(capsys.readouterr().err) == (f"error: {tmp_path / 'notes.png'}: study notes: not an image "
                                                       f"(neither PNG, JPEG nor DICOM)")


@pytest.mark.parametrize("engine, message", [
    (["--judge-engine", "fast"], "error: JUDGE_ENGINE 'fast': choose one of ('static', 'continuous', 'server')"),
    (["--judge-engine", "server", "--judge-url", "http://127.0.0.1:{port}"],
     "error: JUDGE_URL http://127.0.0.1:{port}: no OpenAI-compatible server answers there (ConnectError: "),
], ids=["unknown engine", "dead url"])
def test_a_wrong_judge_is_one_line_and_status_2_before_any_model_loads(engine, message, tiny_model_dir, tmp_path,
                                                                       capsys, monkeypatch):
    """A preference preset's judge is checked before the model loads (its weights: "unused/judge" exists nowhere);
    nothing listens on the free port."""
    from helpers.train import training

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the judge was checked")

    monkeypatch.setattr(training, "load_training_model", no_model)
    port = free_port()
    assert commands.main(["train", "--profile", "demo", "--artifacts-dir", str(tmp_path), "--model-id",
                          str(tiny_model_dir), "--preset", "two_stage_dpo", "--judge-model-id", "unused/judge",
                          *[part.format(port=port) for part in engine]]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(message.format(port=port))


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A ValueError or FileNotFoundError that is no user error is not caught: only helpers.core.errors.UserError is."""
    def push(*args):
        raise FileNotFoundError("a bug's missing file")

    monkeypatch.setitem(commands.STEPS, "push", push)
    with pytest.raises(FileNotFoundError, match="a bug's missing file"):
        commands.main(["push", "--profile", "demo", "--run-name", "tiny", "--repo-id", "user/name"])
