"""Secrets stay out of everything a run writes (remote code: test_module.py; pickled code: test_bad_input.py)."""

import pytest
from helpers import PLANTED_TOKEN, files_holding_the_token

pytestmark = pytest.mark.slow  # it searches the 500-step subprocess fit


def test_a_planted_hub_token_is_in_no_file_of_the_run_nor_its_output(fitted):
    root, _, proc = fitted
    files, holding = files_holding_the_token(root)
    names = {path.name for path in files}
    # every kind of file a run writes is searched: config, hparams, TensorBoard events, checkpoints, adapter, cache
    assert {"config.yaml", "hparams.yaml", "last.ckpt", "adapter_model.safetensors", "lightning_falcon.json"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names) and any(p.suffix == ".arrow" for p in files)
    assert holding == []
    assert PLANTED_TOKEN not in proc.stdout + proc.stderr
