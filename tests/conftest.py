import os
from pathlib import Path

import pytest

# The tests never touch the network: the Hub is unreachable here, and offline mode makes an unknown
# dataset name fail at once instead of after a minute of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from helpers import PLANTED_TOKEN, SLOW_TIMEOUT, TINY, cli, fit_in_process, restored_process_state


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        if ("slow" in item.keywords or "scale" in item.keywords) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(autouse=True)
def _isolated():
    with restored_process_state():
        yield


@pytest.fixture(scope="session")
def quick_fit(tmp_path_factory) -> Path:
    """The tiny default trained for 10 steps through the CLI, in this process (a few seconds): its run dir.

    A validation (with one generated sample) and a checkpoint fall at step 5 and at the end.
    """
    root = tmp_path_factory.mktemp("quick")
    return fit_in_process(
        root,
        "--trainer.max_steps", "10", "--trainer.val_check_interval", "5", "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_train_steps", "5", "--generation.max_new_tokens", "8",
        "--generation.samples", '["Midjourney prompt for a fantasy village at night"]',
    )  # fmt: skip


def chat_run(tmp_path_factory, steps: int) -> Path:
    """configs/tiny-chat.yaml (the shipped chat sample, the tokenizer's own template, a system prompt) trained for
    `steps` steps in this process: its run dir."""
    root = tmp_path_factory.mktemp(f"chat-{steps}")
    steps_args = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    return fit_in_process(root, *steps_args, "--generation.max_new_tokens", "8", config="tiny-chat.yaml")


@pytest.fixture(scope="session")
def chat_fit(tmp_path_factory) -> Path:
    """configs/tiny-chat.yaml trained for 10 steps: quick, its answers not yet words."""
    return chat_run(tmp_path_factory, 10)


@pytest.fixture(scope="session")
def chat_trained(tmp_path_factory) -> Path:
    """configs/tiny-chat.yaml trained for 200 steps, long enough to answer in words."""
    return chat_run(tmp_path_factory, 200)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="session")
def tiny_nf4():
    """The tiny model loaded as training loads it (nf4, double quantization, fp32 compute), once per run.

    Shared: a test may run it, but must not change it.
    """
    from lightning_falcon.model.quantization import load_causal_lm

    return load_causal_lm(TINY, "nf4", double_quant=True, compute_dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """The tiny default trained once (500 steps, ~30 s): (root, run directory, the fit process).

    Its environment holds a Hub token (`PLANTED_TOKEN`), as a user's would; test_security.py looks for it.
    """
    root = tmp_path_factory.mktemp("e2e")
    proc = cli(root, "fit", env={"HF_TOKEN": PLANTED_TOKEN, "HUGGING_FACE_HUB_TOKEN": PLANTED_TOKEN})
    return root, root / "runs" / "tiny" / "version_0", proc
