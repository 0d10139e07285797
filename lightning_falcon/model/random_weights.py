"""Random-initialised checkpoints of a model config, for dry runs and benchmarks without downloads.

The checkpoint is written once into a cache directory and then loaded through the same
`from_pretrained` + quantization path as real weights, so a dry run exercises the real loader.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lightning_falcon.files import staged_directory


def random_checkpoint(model_name_or_path: str, cache_dir: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """Return a directory holding random weights for the architecture of `model_name_or_path`.

    Only its `config.json` is read (from a local directory or the Hub). Weights are stored in bf16.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / f"random-{config.model_type}-{key}"
    if (target / "config.json").exists():
        return target
    # On CPU: Lightning calls configure_model under the GPU as default device, and a full bf16
    # 7B (14 GB) or 40B (80 GB) must not land there. A forked RNG keeps the caller's seed intact.
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=trust_remote_code)
    # Several nodes sharing the cache may build the same checkpoint at once: the first one stands.
    with staged_directory(target, complete="config.json") as staged:
        model.save_pretrained(staged)
    return target
