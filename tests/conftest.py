import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The tests never touch the network: the Hub is unreachable here, and offline mode makes an unknown
# dataset name fail at once instead of after a minute of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lightning_falcon.assets import resolve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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


def prepared_datamodule(tmp_path, **kwargs):
    """A `PromptDataModule` on the tiny tokenizer (Midjourney data unless `dataset` is given), prepared and set up."""
    from lightning_falcon import PromptDataModule

    kwargs.setdefault("dataset", MIDJOURNEY)
    dm = PromptDataModule(tokenizer=TINY, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def write_jsonl(path, rows) -> str:
    """Write `rows` as a JSONL data file and return its path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def cli(root: Path, subcommand: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lightning_falcon SUBCOMMAND --config configs/tiny.yaml ARGS` with its outputs under `root`.

    Arguments apply in order, so overrides (and further `--config` overlays) come after the tiny config.
    """
    command = [
        sys.executable,
        "-m",
        "lightning_falcon",
        subcommand,
        "--config",
        str(REPO / "configs/tiny.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(root / "runs"),
        "--data.cache_dir",
        str(root / "cache"),
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run, read back from its event files: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# Planted in the environment of the shared fit below and of a Slurm job: no file they write may hold it.
PLANTED_TOKEN = "hf_PLANTEDfitTOKENneverWRITTEN5678"


def files_holding_the_token(root: Path) -> tuple[list[Path], list[Path]]:
    """(every file under `root`, those whose bytes contain PLANTED_TOKEN)."""
    files = [path for path in root.rglob("*") if path.is_file()]
    return files, [path for path in files if PLANTED_TOKEN.encode() in path.read_bytes()]


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """The tiny default trained once (500 steps, ~30 s): (root, run directory, the fit process).

    Its environment holds a Hub token (`PLANTED_TOKEN`), as a user's would; test_security.py looks for it.
    """
    root = tmp_path_factory.mktemp("e2e")
    proc = cli(root, "fit", env={"HF_TOKEN": PLANTED_TOKEN, "HUGGING_FACE_HUB_TOKEN": PLANTED_TOKEN})
    return root, root / "runs" / "tiny" / "version_0", proc


def sample_texts(run_dir: Path) -> dict[int, str]:
    """The generated-samples tables a run logged to TensorBoard: step -> Markdown text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}


def cli_error(root: Path, subcommand: str, *args: str, env: dict | None = None) -> str:
    """Run a command that must fail on bad input: exit 2 and one `lightning_falcon: error:` line naming a fix."""
    command = [sys.executable, "-m", "lightning_falcon", subcommand, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-3000:]
    assert "Traceback" not in err and "quantized linear layers" not in proc.stdout + err  # failed before loading
    last = err.splitlines()[-1]
    assert last.startswith("lightning_falcon: error: ") and "Fix" in last, err
    return last


def tuned_tiny(adapter_dir) -> torch.nn.Module:
    """The trained tiny model as predict builds it: the 4-bit base (fp32 compute) + the adapter's LoRA weights."""
    from lightning_falcon.adapter import load_weights
    from lightning_falcon.lora import FALCON_TARGET_MODULES, apply_lora
    from lightning_falcon.quantization import load_causal_lm

    base = load_causal_lm(TINY, "nf4", True, torch.float32, torch.device("cpu"))
    model = apply_lora(base, 16, 32, 0.0, FALCON_TARGET_MODULES, gradient_checkpointing=False)
    load_weights(model, adapter_dir)
    return model.eval()
