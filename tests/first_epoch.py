"""The first epoch's training batches of each shipped single-dataset config, as a fingerprint.

`tests/fixtures/first-epoch.json` holds the fingerprints the data path gave before datasets could be mixed
(written by `python tests/first_epoch.py --write` at that commit; the 7B and 40B entries again when their chat
template became falcon-7b-instruct's own); `test_mixing.py` checks that a config with
one source in `data.dataset` still gives exactly those batches. Hub datasets are replaced by the shipped sample of
the same shape, and every config is tokenized with the tiny model's tokenizer, so nothing needs the network.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import yaml

from lightning_falcon.assets import resolve

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "first-epoch.json"
LOCAL = {"timdettmers/openassistant-guanaco": "asset:data/guanaco-sample.jsonl"}
# (config, batching, world size): each shipped config as it is, the tiny one in every batching and on 2 ranks
CASES = [
    ("tiny.yaml", None, 1),
    ("tiny.yaml", "padded", 1),
    ("tiny.yaml", "packed", 1),
    ("tiny.yaml", None, 2),
    ("falcon-7b-qlora.yaml", None, 1),
    ("falcon-40b-qlora.yaml", None, 1),
    ("falcon-7b-guanaco.yaml", None, 1),
    ("falcon-7b-guanaco.yaml", "packed", 1),
]


def data_section(config: str) -> dict:
    data = dict(yaml.safe_load((REPO / "configs" / config).read_text())["data"])
    source = data["dataset"] = dict(data["dataset"])  # each of these configs holds one source, as a mapping
    source["dataset"] = LOCAL.get(source["dataset"], source["dataset"])
    return data


def fingerprint(config: str, batching: str | None, world: int, cache_dir: str) -> dict:
    """sha256 of every rank's first-epoch batches (each tensor's name, shape and values), and their count."""
    from lightning_falcon import PromptDataModule

    data = data_section(config)
    if batching is not None:
        data["batching"] = batching
    h, batches = hashlib.sha256(), 0
    for rank in range(world):
        dm = PromptDataModule(**data, tokenizer=resolve("asset:tiny-falcon"), cache_dir=cache_dir)
        dm.prepare_data()
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(0)
        for batch in loader:
            batches += 1
            for key in sorted(batch):
                h.update(f"{key}{tuple(batch[key].shape)}".encode())
                h.update(batch[key].numpy().tobytes())
    return {"batches": batches, "sha256": h.hexdigest()}


def fingerprints() -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as cache:
        return {f"{c} {b or 'as configured'} world={w}": fingerprint(c, b, w, cache) for c, b, w in CASES}


if __name__ == "__main__":
    found = fingerprints()
    if "--write" in sys.argv:
        FIXTURE.write_text(json.dumps(found, indent=1) + "\n")
    print(json.dumps(found, indent=1))
