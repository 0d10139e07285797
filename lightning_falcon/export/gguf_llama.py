"""Falcon3 (`LlamaForCausalLM`) in llama.cpp's `llama` architecture: its metadata, tensor names and layouts.

Follows llama.cpp's converter (`convert_hf_to_gguf.py`: `LlamaModel` over `TextModel.set_gguf_parameters`):
- llama.cpp rotates adjacent pairs of a head's values, transformers the two halves of the head (`rotate_half`),
  so the converter permutes the rows of every query and key head (`LlamaModel.permute`) and so does this file.
- Falcon3 sets `head_dim` apart from hidden_size / heads (256 at 3072 / 12 for the 7B), so the key and value
  lengths and the rotary dimensions are written, not left to llama.cpp's hidden_size / heads.
- The output layer is written unless tied, when llama.cpp reads it from `token_embd` (Falcon3 is untied).
`export/gguf.py` writes the rest.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lightning_falcon.architectures import architecture

NOT_CARRIED = "Fix: export it without --format gguf"


def rope_problems(config) -> list[str]:
    """Scaled rotary positions, which these writers do not carry (Falcon-H1's writer asks too)."""
    kind = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if kind == "default":
        return []
    return [f"the model scales its rotary positions ({kind}), which this GGUF writer does not. {NOT_CARRIED}"]


def problems(config) -> list[str]:
    """What llama.cpp's `llama` graph computes otherwise, or what this writer does not carry: biases, another
    activation than SiLU, scaled rotary positions."""
    found = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        found.append(f"the model's linear layers have biases, which this GGUF writer does not carry. {NOT_CARRIED}")
    if config.hidden_act != "silu":
        found.append(
            f"the model's MLP activation is {config.hidden_act!r}; llama.cpp's llama computes SiLU. {NOT_CARRIED}"
        )
    return found + rope_problems(config)


def decoder_metadata(writer, config) -> None:
    """The sizes, heads, rotary base and RMS-norm epsilon `TextModel.set_gguf_parameters` writes for a decoder of
    grouped-query attention with its own head width (Falcon-H1's writer writes them too)."""
    row = architecture(config)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(row.kv_heads(config))
    writer.add_key_length(row.head_dim(config))
    writer.add_value_length(row.head_dim(config))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def metadata(writer, model: torch.nn.Module) -> None:
    """The hyperparameters llama.cpp's llama loader reads, as `LlamaModel.set_gguf_parameters` writes them."""
    decoder_metadata(writer, model.config)
    writer.add_rope_dimension_count(architecture(model.config).head_dim(model.config))


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from transformers' halves order (x0..x(d/2-1), then the rest) to llama.cpp's pairs
    order (x0, x(d/2), x1, ...): `LlamaModel.permute`."""
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])  # (head, half, pair, ...)
    return halves.swapaxes(1, 2).reshape(weight.shape)


def tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of a merged `LlamaForCausalLM`, in llama.cpp's names and layouts."""
    config, state = model.config, model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        attention = f"{prefix}self_attn."
        yield f"blk.{i}.attn_norm.weight", state[f"{prefix}input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", _rotary_rows(state[f"{attention}q_proj.weight"], config.num_attention_heads)
        kv_heads = architecture(config).kv_heads(config)
        yield f"blk.{i}.attn_k.weight", _rotary_rows(state[f"{attention}k_proj.weight"], kv_heads)
        yield f"blk.{i}.attn_v.weight", state[f"{attention}v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", state[f"{attention}o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", state[f"{prefix}post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", state[f"{prefix}mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", state[f"{prefix}mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", state[f"{prefix}mlp.down_proj.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if not config.tie_word_embeddings:  # tied: llama.cpp reads the output layer from token_embd
        yield "output.weight", state["lm_head.weight"]
