"""A merged Falcon as one GGUF file, as llama.cpp's Falcon loader reads it (and Ollama, built on it).

The tensor names and the fused query-key-value layout follow llama.cpp's own Falcon converter; the
metadata is written from the model's config and tokenizer, never guessed:
- The KV-head count is what the attention really uses. A Falcon-7B config saved by transformers 5 says
  `num_kv_heads: 71` beside `multi_query: true`, and the attention uses one KV head; llama.cpp's converter
  reads the 71, reshapes the fused weight wrongly and fails (intel-extension-for-transformers #731).
- The pre-tokenizer is named from the tokenizer's own definition, not from a hash of known tokenizers,
  so a tokenizer llama.cpp's converter has never seen (the tiny model's) still gets the right one.
- The file is written tensor by tensor: the peak is the merged model plus one converted tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lightning_falcon.data.tokenizer import special_ids
from lightning_falcon.errors import ConfigError

# --gguf_type -> the GGML type of every 2-D weight (norms and biases stay f32, as llama.cpp keeps them).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def kv_heads(config) -> int:
    """The KV heads Falcon's attention computes with: one under multi-query attention (7B), else `num_kv_heads`.

    transformers' FalconAttention ignores `num_kv_heads` unless `new_decoder_architecture` (40B) or not
    `multi_query`.
    """
    if config.new_decoder_architecture or not config.multi_query:
        return config.num_kv_heads
    return 1


def problems(config) -> list[str]:
    """What llama.cpp's Falcon graph cannot compute: it has rotary positions, parallel attention and no biases."""
    found = []
    if getattr(config, "model_type", None) != "falcon":
        found.append(
            f"the model is {getattr(config, 'model_type', '?')!r}, not Falcon. Fix: export it without --format gguf"
        )
    else:
        if config.alibi:
            found.append(
                "the model uses ALiBi, which llama.cpp's Falcon does not. Fix: export it without --format gguf"
            )
        if not config.parallel_attn:
            found.append(
                "the model's attention is not parallel, as llama.cpp's Falcon needs. Fix: export without --format gguf"
            )
        if config.bias:
            found.append(
                "the model's linear layers have biases, which llama.cpp's Falcon has not. "
                "Fix: export without --format gguf"
            )
    return found


def _norm_names(config) -> dict[str, str]:
    # llama.cpp's `attn_norm` feeds the MLP (and, alone, the attention too); `attn_norm_2` is the 40B's attention norm.
    if config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
        return {"ln_mlp": "attn_norm", "ln_attn": "attn_norm_2"}
    return {"input_layernorm": "attn_norm"}


def _fused_qkv(weight: torch.Tensor, config) -> torch.Tensor:
    """Falcon keeps the fused weight as KV groups, each its query heads then one key and one value head;
    llama.cpp wants every query head, then every key head, then every value head."""
    heads, groups = config.num_attention_heads, kv_heads(config)
    head_dim = config.hidden_size // heads
    grouped = weight.view(groups, heads // groups + 2, head_dim, config.hidden_size)
    q = grouped[:, :-2].reshape(heads * head_dim, config.hidden_size)
    k = grouped[:, [-2]].reshape(groups * head_dim, config.hidden_size)
    v = grouped[:, [-1]].reshape(groups * head_dim, config.hidden_size)
    return torch.cat((q, k, v))


def tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of a merged `FalconForCausalLM`, in llama.cpp's names and layouts."""
    config, state = model.config, model.state_dict()
    norms = _norm_names(config)
    yield "token_embd.weight", state["transformer.word_embeddings.weight"]
    for i in range(config.num_hidden_layers):
        prefix = f"transformer.h.{i}."
        for ours, theirs in norms.items():
            for kind in ("weight", "bias"):
                yield f"blk.{i}.{theirs}.{kind}", state[f"{prefix}{ours}.{kind}"]
        yield f"blk.{i}.attn_qkv.weight", _fused_qkv(state[f"{prefix}self_attention.query_key_value.weight"], config)
        yield f"blk.{i}.attn_output.weight", state[f"{prefix}self_attention.dense.weight"]
        yield f"blk.{i}.ffn_up.weight", state[f"{prefix}mlp.dense_h_to_4h.weight"]
        yield f"blk.{i}.ffn_down.weight", state[f"{prefix}mlp.dense_4h_to_h.weight"]
    yield "output_norm.weight", state["transformer.ln_f.weight"]
    yield "output_norm.bias", state["transformer.ln_f.bias"]
    if not config.tie_word_embeddings:  # tied: llama.cpp reads the output layer from token_embd
        yield "output.weight", state["lm_head.weight"]


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: `gpt-2` (byte-level with GPT-2's split) or `falcon`
    (the same after punctuation, then groups of three digits)."""
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
        "nor Falcon's, the two llama.cpp's Falcon takes. "
        "Fix: export with Falcon's own tokenizer, or without --format gguf"
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
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _encoded(tensor: torch.Tensor, gguf_type: str) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = tensor.detach().to(torch.float32).cpu().numpy()
    qtype = _type_of(data.shape, gguf_type)
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quantize(data, qtype)


def _type_of(shape: tuple[int, ...], gguf_type: str):
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or gguf_type == "f32":
        return Q.F32
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]


def write(model: torch.nn.Module, tokenizer, path: Path, gguf_type: str, name: str) -> None:
    """Write a merged `FalconForCausalLM` and its tokenizer as one GGUF file at `path`."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    config = model.config
    ConfigError.collect(problems(config))
    pre = pre_tokenizer(tokenizer)
    if gguf_type == "q8_0" and config.hidden_size % 32:
        raise ConfigError(
            f"q8_0 needs rows of a multiple of 32 values; hidden_size is {config.hidden_size}. Fix: --gguf_type f16"
        )
    writer = gguf.GGUFWriter(str(path), arch="falcon")
    writer.add_name(name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[gguf_type]
    )
    writer.add_context_length(getattr(config, "max_position_embeddings", None) or 2048)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(model.get_submodule("transformer.h.0.mlp.dense_h_to_4h").out_features)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_tensor_data_layout("jploski")  # the query-key-value order of `_fused_qkv`

    tokens, types = _vocabulary(tokenizer, config.vocab_size)
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

    for gguf_name, tensor in tensors(model):  # the shapes first: the header lists every tensor
        qtype = _type_of(tuple(tensor.shape), gguf_type)
        shape = tuple(tensor.shape)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            itemsize = 4 if qtype == gguf.GGMLQuantizationType.F32 else 2
            dtype = np.float32 if itemsize == 4 else np.float16
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * itemsize)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in tensors(model):
        writer.write_tensor_data(_encoded(tensor, gguf_type))
    writer.close()
