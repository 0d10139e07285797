"""Falcon (7B, 40B, 180B, Falcon2-11B) in llama.cpp's `falcon` architecture: its metadata, tensor names and layouts.

Follows llama.cpp's converter (`convert_hf_to_gguf.py`, `FalconModel`), but for the KV-head count: it is what
the attention really uses. A Falcon-7B config saved by transformers 5 says `num_kv_heads: 71` beside
`multi_query: true`, and the attention uses one KV head; llama.cpp's converter reads the 71, reshapes the fused
weight wrongly and fails (intel-extension-for-transformers #731). `export/gguf.py` writes the rest.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lightning_falcon.architectures import architecture


def problems(config) -> list[str]:
    """What llama.cpp's Falcon graph cannot compute: it has rotary positions, parallel attention and no biases."""
    found = []
    if config.alibi:
        found.append("the model uses ALiBi, which llama.cpp's Falcon does not. Fix: export it without --format gguf")
    if not config.parallel_attn:
        found.append(
            "the model's attention is not parallel, as llama.cpp's Falcon needs. Fix: export without --format gguf"
        )
    if config.bias:
        found.append(
            "the model's linear layers have biases, which llama.cpp's Falcon has not. Fix: export without --format gguf"
        )
    return found


def metadata(writer, model: torch.nn.Module) -> None:
    """The hyperparameters llama.cpp's Falcon loader reads, from the merged model's config."""
    config = model.config
    writer.add_context_length(getattr(config, "max_position_embeddings", None) or 2048)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(model.get_submodule("transformer.h.0.mlp.dense_h_to_4h").out_features)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(architecture(config).kv_heads(config))
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_tensor_data_layout("jploski")  # the query-key-value order of `_fused_qkv`


def _norm_names(config) -> dict[str, str]:
    # llama.cpp's `attn_norm` feeds the MLP (and, alone, the attention too); `attn_norm_2` is the 40B's attention norm.
    if config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
        return {"ln_mlp": "attn_norm", "ln_attn": "attn_norm_2"}
    return {"input_layernorm": "attn_norm"}


def _fused_qkv(weight: torch.Tensor, config) -> torch.Tensor:
    """Falcon keeps the fused weight as KV groups, each its query heads then one key and one value head;
    llama.cpp wants every query head, then every key head, then every value head."""
    heads, groups = config.num_attention_heads, architecture(config).kv_heads(config)
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
