import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SAMPLE_DIR = ROOT / "data" / "sample"
SHARED_IU_XRAY = ROOT.parent / "shared" / "iu_xray"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub, here or in CI
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

needs_shared = pytest.mark.skipif(not (SHARED_IU_XRAY / "annotation.json").is_file(),
                                  reason="../shared/iu_xray (the real annotation) is not present")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_studies():
    from helpers import data

    return data.load_studies(SAMPLE_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_studies) -> Path:
    """The demo's tiny random LLaVA-NeXT, built once per session from the sample's report text."""
    from helpers import demo_models

    return demo_models.build_random_llava(tmp_path_factory.mktemp("tiny") / "tiny-llava",
                                        demo_models.tokenizer_corpus(sample_studies))


@pytest.fixture(scope="session")
def load_tiny(tiny_model_dir):
    """load_tiny(visual_tokens): the tiny model and processor in that mode, loaded once per mode like a hub id."""
    from helpers import modeling

    loaded = {}

    def load(visual_tokens):
        if visual_tokens not in loaded:
            loaded[visual_tokens] = modeling.load_model_and_processor(str(tiny_model_dir), visual_tokens=visual_tokens)
        return loaded[visual_tokens]

    return load


@pytest.fixture(scope="session")
def model_and_processor(load_tiny):
    """The tiny model in the default visual-token mode."""
    from helpers.modeling import DEFAULT_VISUAL_TOKENS

    return load_tiny(DEFAULT_VISUAL_TOKENS)


@pytest.fixture(autouse=True)
def close_figures():
    """Figures the code under test drew are closed after each test (pyplot keeps them otherwise)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="session")
def green_judge_dir(tmp_path_factory, sample_studies) -> Path:
    """The demo's tiny GREEN-format judge, built once per session from the sample's report text."""
    from helpers import demo_models

    return demo_models.build_random_judge(tmp_path_factory.mktemp("green-judge") / "tiny-green-judge",
                                          demo_models.tokenizer_corpus(sample_studies))
