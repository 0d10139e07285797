"""Export's steps: check the request, then write the adapter, the merged model, or a GGUF file and its Modelfile.

Merging a QLoRA adapter into the original 16-bit base changes the model's outputs (artidoro/qlora #28,
peft #2321): the adapter was trained against the 4-bit weights, not the originals, and the difference
is the quantization error of every layer. `--merge` therefore merges into the base *dequantized*: the
base is quantized exactly as in training (the settings are saved beside the adapter), each 4-bit layer
is expanded back to a dense one, and LoRA is added to that (`export/merge.py`). The merged model then
computes what the 4-bit base + adapter computed (`tests/test_export.py` measures the difference).
`--merge_into original` gives the usual PEFT merge into the unquantized weights instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from lightning_falcon.assets import resolve
from lightning_falcon.data.tokenizer import special_ids
from lightning_falcon.errors import ConfigError, first_line
from lightning_falcon.export import gguf
from lightning_falcon.export.merge import merge_into_dequantized
from lightning_falcon.export.modelfile import modelfile
from lightning_falcon.files import staged_directory
from lightning_falcon.model import adapter as adapters
from lightning_falcon.model.config import read_model_config
from lightning_falcon.model.quantization import DTYPES, load_causal_lm

# An existing --output is replaced (with --overwrite) only if it holds one of these: an earlier export.
EXPORT_MARKERS = ("adapter_config.json", "config.json", "Modelfile")


def hub_token() -> str | None:
    """The Hub token, from the environment only (`HF_TOKEN`): never a flag, and never written anywhere."""
    return os.environ.get("HF_TOKEN") or None


def export(
    adapter: str,
    output: str,
    merge: bool = False,
    merge_into: Literal["dequantized", "original"] = "dequantized",
    dtype: Literal["bf16", "fp16", "fp32"] | None = None,
    base: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = True,
    trust_remote_code: bool = False,
    format: Literal["transformers", "gguf"] = "transformers",
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] | None = None,
) -> Path:
    """Export a trained adapter, or merge it into its base, as a directory; optionally push it to the Hub.

    Args:
        adapter: The adapter directory a run wrote (`runs/NAME/version_N/adapter`).
        output: Directory to write. Written beside it first and renamed into place, so a failed export leaves nothing.
        merge: Merge LoRA into the base and save a plain transformers model (`AutoModelForCausalLM.from_pretrained`).
            Without it, the adapter (and tokenizer) for `PeftModel.from_pretrained`.
        merge_into: `dequantized`: the 4-bit base as trained, expanded to dense weights (outputs as in training);
            `original`: the unquantized base weights (PEFT's usual merge; outputs shift by the quantization error).
        dtype: Dtype of the merged weights; default the base's own (its config.json `torch_dtype`), else fp32.
        base: The base model (Hub id or directory); default the one the adapter was trained on.
        device: Where the base is quantized and merged: `auto` (CUDA if present, else CPU), `cpu` or `cuda`.
        overwrite: Replace `output` if it holds an earlier export (never any other directory).
        push_to_hub: Also upload the directory to this Hub repo (`user/name`). The token is read from the
            environment (`HF_TOKEN`), never from a flag, and is written nowhere.
        private: Create the Hub repo as private.
        trust_remote_code: Run custom modelling code from the base's repository, for an adapter trained with
            `model.trust_remote_code`. Never taken from the adapter's metadata: only you can consent to it.
        format: `transformers`: a directory for transformers and PEFT (as `--merge` says). `gguf`: the merged
            model (always merged) as one GGUF file for llama.cpp, with an Ollama `Modelfile` beside it.
        gguf_type: The GGUF weights' type: `f32`, `f16` (default), `bf16` or `q8_0` (8-bit, about half of f16).
            Norms and biases stay f32. The merge is in fp32 for `f32`, else in the base's own dtype.
    """
    out = Path(output).expanduser().resolve()
    problems = []
    try:
        source = adapters.check_adapter_dir(adapter).resolve()
    except ConfigError as e:
        problems.append(str(e))
        source = None
    metadata = adapters.read_metadata(source) if source else {}
    problems += _output_problems(out, source, overwrite)
    token = hub_token() if push_to_hub else None
    if push_to_hub and not token:
        problems.append("--push_to_hub needs a Hub token in the environment. Fix: export HF_TOKEN=hf_...")
    as_gguf = format == "gguf"
    if not (merge or as_gguf) and (dtype or base or merge_into != "dequantized"):
        problems.append("--dtype, --base and --merge_into apply only with --merge. Fix: add --merge")
    if as_gguf and dtype:
        problems.append("--dtype is the transformers format's; a GGUF's weights take --gguf_type. Fix: drop --dtype")
    if gguf_type and not as_gguf:
        problems.append("--gguf_type applies only with --format gguf. Fix: add --format gguf")
    merge = merge or as_gguf
    if merge and merge_into == "dequantized" and source and not metadata:
        problems.append(
            f"{source} has no {adapters.METADATA}, so how its base was quantized in training is unknown. "
            "Fix: --merge_into original (for an adapter trained on an unquantized base)"
        )
    if merge and metadata.get("trust_remote_code") and not trust_remote_code:
        problems.append(
            f"{source} was trained with trust_remote_code, so merging runs Python code from its base's repository. "
            "Fix: add --trust_remote_code true if you trust that repository"
        )
    if as_gguf and source and not problems:
        problems += _gguf_problems(source, metadata, base, trust_remote_code)
    ConfigError.collect(problems)

    with staged_directory(out) as staging:  # an earlier export is kept until this one is whole
        if as_gguf:
            gguf_type = gguf_type or "f16"
            model, tokenizer = _merge(
                source, metadata, merge_into, "fp32" if gguf_type == "f32" else None, base, device, trust_remote_code
            )
            name = f"{out.name}-{gguf_type}.gguf"
            gguf.write(model, tokenizer, staging / name, gguf_type, out.name)
            stop = tokenizer.convert_ids_to_tokens(special_ids(tokenizer)[0])
            text = modelfile(name, metadata["prompt"], stop, tokenizer)
            (staging / "Modelfile").write_text(text, encoding="utf-8")
        elif merge:
            model, tokenizer = _merge(source, metadata, merge_into, dtype, base, device, trust_remote_code)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        else:
            for path in source.iterdir():
                if path.is_file():
                    shutil.copy2(path, staging / path.name)
        if merge and (source / adapters.METADATA).is_file():
            shutil.copy2(source / adapters.METADATA, staging / adapters.METADATA)
    what = "a GGUF file and its Modelfile" if as_gguf else "a merged model" if merge else "the adapter"
    print(f"[export] wrote {what} to {out}")
    if push_to_hub:
        _push(out, push_to_hub, token, private)
    return out


def _output_problems(out: Path, source: Path | None, overwrite: bool) -> list[str]:
    """What would make writing `out` lose something: an existing directory that is not an earlier export,
    the adapter itself or a directory holding it, the working or home directory."""
    if source is not None and (out == source or out in source.parents or source in out.parents):
        return [f"--output {out} overlaps the adapter directory {source}. Fix: choose a separate directory"]
    if out in (Path.cwd(), Path.home()) or out == out.parent:
        return [f"--output {out} is the working, home or root directory. Fix: name a new directory"]
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return []
    if not overwrite:
        return [f"--output {out} exists and is not empty. Fix: choose a new --output, or pass --overwrite"]
    if not out.is_dir() or not any((out / name).is_file() for name in EXPORT_MARKERS):
        return [f"--output {out} is not an earlier export, so --overwrite will not replace it. Fix: name a new one"]
    return []


def _base_of(source: Path, metadata: dict, base: str | None) -> str:
    if base is not None:
        return resolve(base)
    if metadata.get("base"):
        return metadata["base"]
    return json.loads((source / adapters.ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def _gguf_problems(source: Path, metadata: dict, base: str | None, trust: bool) -> list[str]:
    """What would stop a GGUF after the merge: a family the table refuses GGUF for, a model its llama.cpp
    architecture cannot compute, or a tokenizer llama.cpp cannot split as ours does. Read from config.json and the
    tokenizer alone, before any weights load."""
    from transformers import AutoTokenizer

    found = gguf.problems(read_model_config(_base_of(source, metadata, base), trust))
    try:
        gguf.pre_tokenizer(AutoTokenizer.from_pretrained(_tokenizer_dir(source, metadata, base)))
    except ConfigError as e:
        found.append(str(e))
    if not metadata.get("prompt"):
        found.append(
            f"{source} does not say how training rendered prompts, which the Modelfile's template needs. "
            "Fix: export an adapter that a lightning_falcon fit wrote (it has lightning_falcon.json)"
        )
    return found


def _tokenizer_dir(source: Path, metadata: dict, base: str | None) -> Path | str:
    return source if (source / "tokenizer_config.json").is_file() else _base_of(source, metadata, base)


def _merge(
    source: Path,
    metadata: dict,
    merge_into: str,
    dtype: str | None,
    base: str | None,
    device: str,
    trust: bool,
):
    """The merged model on the CPU, in `dtype` (default the base's own), and the tokenizer, ready to save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = _base_of(source, metadata, base)
    config = read_model_config(base_path, trust)  # a missing base fails here, before any weights load
    target = DTYPES[dtype] if dtype else _config_dtype(config)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_device = torch.device(device)
    quantization = metadata.get("quantization", "nf4")
    if merge_into == "dequantized" and quantization != "none":
        # The same load as training (settings from the adapter's metadata), so the 4-bit weights are the
        # very ones the adapter learned against; then each 4-bit layer in turn becomes a dense nn.Linear.
        compute = getattr(torch, metadata.get("compute_dtype", "float32"))
        model = load_causal_lm(
            base_path,
            quantization=quantization,
            double_quant=metadata.get("double_quant", True),
            compute_dtype=compute,
            device=run_device,
            trust_remote_code=trust,
        )
        merged = merge_into_dequantized(PeftModel.from_pretrained(model, str(source)), target)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=target, trust_remote_code=trust)
        model.to(run_device)
        merged = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
    merged = merged.to(device="cpu", dtype=target)
    merged.config.use_cache = True  # training switched the KV cache off
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(source, metadata, base))
    if metadata.get("prompt"):  # what training rendered with (none for `turns`), where the tokenizer is the base's
        tokenizer.chat_template = adapters.chat_template(metadata)
    # generate() then stops at EOS and pads with it without being told (Falcon has no pad token).
    merged.generation_config.eos_token_id, merged.generation_config.pad_token_id = special_ids(tokenizer)
    return merged, tokenizer


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _push(out: Path, repo: str, token: str, private: bool) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out), commit_message="Upload from lightning_falcon export")
    except Exception as e:  # network, permissions, a bad repo name: one line, and the token is not in it
        raise ConfigError(
            f"push to the Hub repo {repo!r} failed ({first_line(e)}); {out} is written. "
            "Fix: check the repo name, the token's write access and the network, then run export again"
        ) from e
    print(f"[export] pushed {out} to https://huggingface.co/{repo}")
