import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SAMPLE_DIR = ROOT / "data" / "sample"
SHARED_IU_XRAY = ROOT.parent / "shared" / "iu_xray"
DEMO_DPO_STUDIES = 4  # the session's demo chain: training studies its preference stage samples candidates for

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub, here or in CI
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# make test's two workers take whole files in collection order (--dist loadfile --no-loadscope-reorder): the files
# over 10 s first, longest first (measured: docs/testing.md), so that the short ones fill in at the end and both
# workers finish together
LONGEST_FIRST = ("test_demo.py", "test_commands.py", "test_families.py", "test_green.py", "test_gpu_check.py",
                 "test_profile_emulation.py", "test_judge_engines.py", "test_continuous_engine.py", "test_training.py",
                 "test_outside_colab.py", "test_metrics.py", "test_run_notebooks.py", "test_preference.py",
                 "test_clinical.py", "test_predict.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


needs_shared = pytest.mark.skipif(not (SHARED_IU_XRAY / "annotation.json").is_file(),
                                  reason="../shared/iu_xray (the real annotation) is not present")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_studies():
    from helpers.core import data

    return data.load_studies(SAMPLE_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_studies) -> Path:
    """The demo's tiny random LLaVA-NeXT, built once per session from the sample's report text."""
    from helpers.demo import tiny_models

    return tiny_models.build_random_llava(tmp_path_factory.mktemp("tiny") / "tiny-llava",
                                        tiny_models.tokenizer_corpus(sample_studies))


@pytest.fixture(scope="session")
def load_tiny(tiny_model_dir):
    """load_tiny(visual_tokens): the tiny model and processor in that mode, loaded once per mode like a hub id."""
    from helpers.model import modeling

    loaded = {}

    def load(visual_tokens):
        if visual_tokens not in loaded:
            loaded[visual_tokens] = modeling.load_model_and_processor(str(tiny_model_dir), visual_tokens=visual_tokens)
        return loaded[visual_tokens]

    return load


@pytest.fixture(scope="session")
def model_and_processor(load_tiny):
    """The tiny model in the default visual-token mode."""
    from helpers.model.modeling import DEFAULT_VISUAL_TOKENS

    return load_tiny(DEFAULT_VISUAL_TOKENS)


@pytest.fixture(scope="session")
def demo_chain(tmp_path_factory, green_judge_dir) -> Path:
    """`make demo`, run once per session: the four notebooks on the sample in the default visual-token mode (02 and
    03 once per preset of run_notebooks.DEMO_RUNS), into one artifacts folder. Tests read it and write nothing there,
    except test_demo.py's smoke chain (its own folders, checked to leave every other file byte for byte).

    Two things differ from a plain `make demo`: the preference stage samples candidates for DPO_STUDIES=4 training
    studies (plus the 2 held out), not all 14: sampling is the chain's longest step, and 4 still give pairs to train on;
    and the demo judge is the session's build (`green_judge_dir`, the same build), copied where notebook 02 would build
    it.
    """
    from helpers.model import modeling
    from helpers.demo import tiny_models
    from helpers.run_notebooks import main

    out = tmp_path_factory.mktemp("demo")
    shutil.copytree(green_judge_dir, out / "models" / tiny_models.DEMO_JUDGE_DIR)
    assert main(["--out", str(out), "-p", "VISUAL_TOKENS", modeling.DEFAULT_VISUAL_TOKENS,
                 "-p", "DPO_STUDIES", str(DEMO_DPO_STUDIES)]) == 0
    return out


@pytest.fixture(autouse=True)
def close_figures():
    """Figures the code under test drew are closed after each test (pyplot keeps them otherwise)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="session")
def green_judge_dir(tmp_path_factory, worker_id, sample_studies) -> Path:
    """The demo's tiny GREEN-format judge, as notebooks 02 and 04 build it from the sample's report text (the same
    files byte for byte, compared once: docs/testing.md): built once per session, by the first xdist worker that needs
    it (a file lock, pytest-xdist's recipe), into the folder the workers' own temporary folders share; a build takes
    ~18 s and five test files use it."""
    from filelock import FileLock

    from helpers.demo import tiny_models

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    with FileLock(shared / "tiny-green-judge.lock"):  # build_random_judge returns a finished build as it is
        return tiny_models.build_random_judge(shared / "tiny-green-judge", tiny_models.tokenizer_corpus(sample_studies))
