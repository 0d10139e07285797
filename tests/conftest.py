import json
import os

import pytest

# The tests never touch the network: the Hub is unreachable here, and offline mode makes an unknown
# dataset name fail at once instead of after a minute of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lightning_falcon.assets import resolve  # noqa: E402

TINY = resolve("asset:tiny-falcon")
MIDJOURNEY = resolve("asset:data/midjourney.jsonl")
GUANACO = resolve("asset:data/guanaco-sample.jsonl")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_jsonl(path, rows) -> str:
    """Write `rows` as a JSONL data file and return its path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)
