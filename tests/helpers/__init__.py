"""What the tests share: the shipped tiny assets, in-process and subprocess runs, and readers of a run's outputs.

Fixtures stay in `tests/conftest.py`; tests import these by name (`from helpers import TINY`).
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from processes import run_process

from lightning_falcon.assets import resolve

REPO = Path(__file__).resolve().parents[2]
TINY = resolve("asset:tiny-falcon")
# The tiny models of the other families (`lightning_falcon/architectures.py`), with their tokenizers and templates.
TINY_FAMILIES = {"falcon3": resolve("asset:tiny-falcon3"), "falcon-h1": resolve("asset:tiny-falcon-h1")}
MIDJOURNEY = resolve("asset:data/midjourney.jsonl")
GUANACO = resolve("asset:data/guanaco-sample.jsonl")
GUANACO_CHAT = resolve("asset:data/guanaco-chat.jsonl")


# pytest's own per-test limit is `timeout` in pyproject.toml (the fast tier); a slow- or scale-tier test gets this.
# It outlasts processes.CHILD_TIMEOUT, so a hung child process is reported with its own stacks first.
SLOW_TIMEOUT = 1200


@contextlib.contextmanager
def restored_process_state():
    """Undo what an in-process run changes for the tests after it: Lightning sets environment variables
    (PL_GLOBAL_SEED; OMP_NUM_THREADS and MASTER_PORT under DDP) and torch's thread count, and every later
    subprocess of the suite would inherit them."""
    environ, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


def tiny_arguments(root: Path, subcommand: str, *args: str, config: str = "tiny.yaml") -> list[str]:
    """`SUBCOMMAND --config configs/CONFIG ARGS` with the run's logs and data cache under `root`."""
    return [
        subcommand, "--config", str(REPO / "configs" / config), "--trainer.logger.init_args.save_dir",
        str(root / "runs"), "--data.cache_dir", str(root / "cache"), *args,
    ]  # fmt: skip


def fit_in_process(root: Path, *args: str, config: str = "tiny.yaml") -> Path:
    """`lightning_falcon fit --config configs/CONFIG ARGS` in this process, outputs under `root`; its run dir."""
    from lightning_falcon.commands.main import main

    with restored_process_state():
        main(tiny_arguments(root, "fit", "--trainer.enable_progress_bar", "false", *args, config=config))
    (run,) = (root / "runs" / Path(config).stem).iterdir()
    return run


def prepared_datamodule(tmp_path, **kwargs):
    """A `PromptDataModule` on the tiny tokenizer (Midjourney data unless `dataset` is given), prepared and set up."""
    from lightning_falcon import PromptDataModule

    kwargs.setdefault("dataset", MIDJOURNEY)
    dm = PromptDataModule(tokenizer=TINY, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def chat_format(tokenizer, template: str = "instruction", kind: str = "prompt_response", system: str | None = None):
    """The `Chat` format a run with `data.chat_template: template` renders `kind` rows with, for this tokenizer."""
    from lightning_falcon.data.chat_templates import resolve_template
    from lightning_falcon.data.conversations import rendering_of
    from lightning_falcon.data.formats import Chat

    columns = {"messages": ("messages",), "alpaca": ("instruction", "input", "output")}.get(
        kind, ("prompt", "response")
    )
    return Chat(kind, columns, rendering_of(tokenizer, resolve_template(template, tokenizer)), system)


def falcon2_11b_shaped(root: Path) -> Path:
    """A random Falcon with Falcon2-11B's traits from its shipped config (8 KV groups under new_decoder_architecture,
    one layer norm per block, an untied output layer, rope theta 500,042) at the tiny model's width and vocabulary:
    the checkpoint directory, which takes the tiny tokenizer."""
    from lightning_falcon.model.random_weights import random_checkpoint

    config = json.loads((Path(resolve("asset:falcon-11b")) / "config.json").read_text())
    assert config["num_ln_in_parallel_attn"] == 1 and config["tie_word_embeddings"] is False
    # as the tiny Falcon: a wide init gives the frozen random weights' logits a range LoRA can move
    toy = {"hidden_size": 128, "num_attention_heads": 8, "num_kv_heads": 2, "ffn_hidden_size": 512}
    toy |= {"num_hidden_layers": 2, "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.15}
    shape = root / "falcon2-11b-shaped"
    shape.mkdir(parents=True, exist_ok=True)
    (shape / "config.json").write_text(json.dumps(config | toy))
    return random_checkpoint(str(shape), root / "random")


def write_jsonl(path, rows) -> str:
    """Write `rows` as a JSONL data file and return its path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(
    root: Path, subcommand: str, *args: str, env: dict | None = None, config: str = "tiny.yaml"
) -> subprocess.CompletedProcess:
    """`python -m lightning_falcon SUBCOMMAND --config configs/CONFIG ARGS` with its outputs under `root`.

    Arguments apply in order, so overrides (and further `--config` overlays) come after the tiny config.
    """
    command = [sys.executable, "-m", "lightning_falcon", *tiny_arguments(root, subcommand, *args, config=config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = run_process(command, cwd=root, env=env)
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


def adapter_changes_the_model(adapter_dir: Path, base_path: str = TINY) -> None:
    """The adapter loads onto its tiny base with plain PEFT, and changes its logits (it is not empty)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(adapter_dir))(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


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
    proc = run_process(command, cwd=root, env=env)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-3000:]
    assert "Traceback" not in err and "quantized linear layers" not in proc.stdout + err  # failed before loading
    last = err.splitlines()[-1]
    assert last.startswith("lightning_falcon: error: ") and "Fix" in last, err
    return last


def tuned_tiny(adapter_dir, base_path: str = TINY) -> torch.nn.Module:
    """A trained tiny model as predict builds it: the 4-bit base (fp32 compute) + the adapter's LoRA weights (r 16,
    the family's default targets)."""
    from lightning_falcon.architectures import architecture
    from lightning_falcon.model.adapter import load_weights
    from lightning_falcon.model.lora import apply_lora
    from lightning_falcon.model.quantization import load_causal_lm

    base = load_causal_lm(base_path, "nf4", True, torch.float32, torch.device("cpu"))
    targets = architecture(base.config).lora_targets
    model = apply_lora(base, 16, 32, 0.0, targets, gradient_checkpointing=False)
    load_weights(model, adapter_dir)
    return model.eval()


def on_a_gpu(monkeypatch, capability: tuple[int, int], name: str = "a GPU") -> list:
    """Make this CPU machine answer as a CUDA GPU of `capability` would; returns the devices asked about."""
    asked = []

    def get_device_capability(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return asked


def layer_bytes(module: torch.nn.Module) -> int:
    """Bytes a linear layer really holds: packed weights, bias and quantization constants."""
    from lightning_falcon.model.quantization import constant_bytes

    return sum(t.numel() * t.element_size() for t in module.parameters(recurse=False)) + constant_bytes(module)


def unquantized_bytes(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the same layer would take unquantized in `dtype` (16-bit by default: the usual base)."""
    n = module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    return n * torch.empty((), dtype=dtype).element_size()
