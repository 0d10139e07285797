"""A merged model as one GGUF file, as llama.cpp (and Ollama, built on it) loads it: what every architecture shares.

The llama.cpp architecture is the model's row of the table (`architecture(config).gguf`: `falcon`, `llama`,
`falcon-h1`), and that architecture's module writes its hyperparameters and its tensors, in the names and
layouts of llama.cpp's own converter (`gguf_falcon.py`, `gguf_llama.py`, `gguf_falcon_h1.py`, each with
`problems(config)`, `metadata(writer, model)` and `tensors(model)`). This file writes the rest, never guessed:
- The pre-tokenizer is named from the tokenizer's own definition, not from a hash of known tokenizers,
  so a tokenizer llama.cpp's converter has never seen (the tiny model's) still gets the right one.
- Each tensor's type follows the converter: 1-D tensors, norms, the Mamba conv and the suffix-less ssm_a and
  ssm_d stay f32; a row q8_0 cannot split into blocks of 32 falls back to f16.
- The file is written tensor by tensor: the peak is the merged model plus one converted tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from lightning_falcon.architectures import architecture
from lightning_falcon.data.tokenizer import special_ids
from lightning_falcon.errors import ConfigError
from lightning_falcon.export import gguf_falcon, gguf_falcon_h1, gguf_llama

# --gguf_type: the GGML type of the 2-D weights (the tensors llama.cpp keeps in f32 aside: `_type_of`).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

# llama.cpp's architecture name (the table's `gguf`) -> the module that writes it.
WRITERS: dict[str, ModuleType] = {"falcon": gguf_falcon, "llama": gguf_llama, "falcon-h1": gguf_falcon_h1}


def problems(config) -> list[str]:
    """Why llama.cpp cannot run the model as transformers does, read from its config alone: a family the table
    refuses GGUF for (its reason), or what the family's llama.cpp graph cannot compute."""
    try:
        row = architecture(config)
    except ConfigError as e:
        return [str(e)]
    if row.gguf is None:
        return [
            f"GGUF cannot hold {row.family} as transformers runs it: {row.no_gguf}. Fix: export without --format gguf"
        ]
    return WRITERS[row.gguf].problems(config)


def tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of a merged model, in its llama.cpp architecture's names and layouts (that writer's)."""
    return WRITERS[architecture(model.config).gguf].tensors(model)


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: `gpt-2` (byte-level with GPT-2's split) or `falcon`
    (the same after punctuation, then groups of three digits), for a model of any architecture.

    Another split is refused rather than guessed: a wrong name makes llama.cpp split text otherwise than training
    did, silently. Falcon3's and Falcon-H1's own tokenizers have names of their own in llama.cpp (`falcon3`,
    `falcon-h1`), which this does not recognise."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = definition.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if definition.get("model", {}).get("type") == "BPE" and byte_level and byte_level[0].get("use_regex", True):
        if kinds == ["ByteLevel"] and not byte_level[0].get("add_prefix_space"):
            return "gpt-2"
        if kinds == ["Punctuation", "ByteLevel", "Digits", "Split"]:
            return "falcon"
    raise ConfigError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is neither GPT-2's byte-level split "
        "nor Falcon-7B's, the two this export names for llama.cpp. "
        "Fix: use a tokenizer with one of those splits, or export without --format gguf"
    )


def _vocabulary(tokenizer, size: int) -> tuple[list[str], list[int]]:
    """Every id's token and GGUF type, padded to the embedding's rows as llama.cpp's converter pads."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:  # its own text: a vocabulary entry of the same id (a renamed special token) loses
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _encoded(name: str, tensor: torch.Tensor, gguf_type: str) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = tensor.detach().to(torch.float32).cpu().numpy()
    qtype = _type_of(name, data.shape, gguf_type)
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quantize(data, qtype)


def _type_of(name: str, shape: tuple[int, ...], gguf_type: str):
    """The GGML type llama.cpp's converter gives a tensor (`ModelBase.prepare_tensors`)."""
    from gguf import GGMLQuantizationType as Q

    kept = len(shape) == 1 or name.endswith("_norm.weight") or ".ssm_conv1d." in name or not name.endswith(".weight")
    if kept or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0" and shape[-1] % 32:  # q8_0 packs rows in blocks of 32 values; the converter takes f16
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]


def write(model: torch.nn.Module, tokenizer, path: Path, gguf_type: str, name: str) -> None:
    """Write a merged model of a family the table gives a llama.cpp architecture, and its tokenizer, as one GGUF
    file at `path`."""
    import gguf

    config = model.config
    ConfigError.collect(problems(config))
    pre = pre_tokenizer(tokenizer)
    arch = architecture(config).gguf
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[gguf_type]
    )
    WRITERS[arch].metadata(writer, model)
    _add_tokenizer(writer, tokenizer, pre, config.vocab_size)
    _add_tensors(writer, model, gguf_type)
    writer.close()


def _add_tokenizer(writer, tokenizer, pre: str, size: int) -> None:
    """The byte-level BPE vocabulary, merges, special ids and chat template, as llama.cpp's `gpt2` model reads them."""
    tokens, types = _vocabulary(tokenizer, size)
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in definition["model"]["merges"]]
    eos, pad = special_ids(tokenizer)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(False)  # training never prepended one
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:  # llama.cpp, and servers built on it, render chats with it
        writer.add_chat_template(tokenizer.chat_template)


def _add_tensors(writer, model: torch.nn.Module, gguf_type: str) -> None:
    """Two passes over the architecture's tensors: their shapes and types first (the header lists every tensor),
    then their data, one converted tensor at a time."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    Q = gguf.GGMLQuantizationType
    for gguf_name, tensor in tensors(model):
        shape = tuple(tensor.shape)
        qtype = _type_of(gguf_name, shape, gguf_type)
        if qtype in (Q.F32, Q.F16):
            itemsize = 4 if qtype == Q.F32 else 2
            dtype = np.float32 if itemsize == 4 else np.float16
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * itemsize)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, tensor in tensors(model):
        writer.write_tensor_data(_encoded(gguf_name, tensor, gguf_type))
