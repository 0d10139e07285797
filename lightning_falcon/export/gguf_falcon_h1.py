"""Falcon-H1 in llama.cpp's `falcon-h1` architecture: its metadata, tensor names and layouts.

Follows llama.cpp's converter (`convert_hf_to_gguf.py`: `FalconH1Model` over `Mamba2Model`), tensor by tensor.
llama.cpp's graph has none of Falcon-H1's μP multipliers, so the converter folds every one of them into the
weight that precedes or follows it, and so does this file:
- token_embd × `embedding_multiplier`, output × `lm_head_multiplier`;
- attn_q, attn_v × `attention_in_multiplier`, attn_k × that and `key_multiplier`, attn_output ×
  `attention_out_multiplier`;
- ssm_in × `ssm_in_multiplier`, its rows × `ssm_multipliers` (z, x, B, C, dt, as transformers' `mup_vector`),
  ssm_out × `ssm_out_multiplier`;
- ffn_gate × `mlp_multipliers[0]`, ffn_down × `mlp_multipliers[1]`.
The Mamba-2 state takes llama.cpp's forms: ssm_a = -exp(A_log) and ssm_d = D as (heads, 1), the conv1d weight
as (channels, kernel), the gated norm's weight as (groups, width / groups), dt_bias as `ssm_dt.bias`.
Falcon-H1's attention rotates the halves of each head, as llama.cpp's falcon-h1 does (NEOX), so nothing is permuted.
The output layer is always written: tied, `token_embd` carries the embedding's multiplier, not the head's.
`export/gguf.py` writes the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lightning_falcon.architectures import mamba_width
from lightning_falcon.export.gguf_llama import NOT_CARRIED, decoder_metadata, rope_problems


def problems(config) -> list[str]:
    """What llama.cpp's falcon-h1 graph computes otherwise, or what this writer does not carry."""
    found = []
    biases = [b for b in ("attention_bias", "mlp_bias", "projectors_bias", "mamba_proj_bias") if getattr(config, b)]
    if biases:
        found.append(
            f"the model's linear layers have biases ({', '.join(biases)}), which llama.cpp's falcon-h1 does not "
            f"take. {NOT_CARRIED}"
        )
    if config.hidden_act != "silu":
        found.append(
            f"the model's MLP activation is {config.hidden_act!r}; llama.cpp's falcon-h1 computes SiLU. {NOT_CARRIED}"
        )
    if config.mamba_rms_norm and config.mamba_norm_before_gate:
        found.append(f"the model's Mamba norm comes before its gate; llama.cpp's falcon-h1 gates first. {NOT_CARRIED}")
    low, high = config.time_step_limit or (0.0, math.inf)
    if low > 0.0 or high != math.inf:  # the time step is a softplus, never below 0: (0, inf) clamps nothing
        found.append(f"the model clamps its Mamba time step to {low, high}; llama.cpp's does not. {NOT_CARRIED}")
    return found + rope_problems(config)


def metadata(writer, model: torch.nn.Module) -> None:
    """The hyperparameters llama.cpp's falcon-h1 loader reads, with the values `FalconH1Model.set_gguf_parameters`
    leaves (it overrides some of `Mamba2Model`'s)."""
    config = model.config
    width = mamba_width(config)
    decoder_metadata(writer, config)
    writer.add_ssm_conv_kernel(config.mamba_d_conv)
    writer.add_ssm_inner_size(width)
    writer.add_ssm_state_size(config.mamba_d_state)
    writer.add_ssm_time_step_rank(width // config.mamba_d_head)  # llama.cpp's name for the Mamba heads
    writer.add_ssm_group_count(config.mamba_n_groups)


def _ssm_in_scale(config) -> torch.Tensor:
    """`ssm_in_multiplier` × `ssm_multipliers` per output row of in_proj: z, x, B, C, then dt."""
    width, groups_state = mamba_width(config), config.mamba_n_groups * config.mamba_d_state
    z, x, b, c, dt = config.ssm_multipliers
    sections = ((width, z), (width, x), (groups_state, b), (groups_state, c), (config.mamba_n_heads, dt))
    scale = torch.cat([torch.full((rows, 1), float(m)) for rows, m in sections])
    return scale * config.ssm_in_multiplier


def tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of a merged `FalconH1ForCausalLM`, in llama.cpp's names and layouts, multipliers folded."""
    config, state = model.config, model.state_dict()

    def weight(name: str) -> torch.Tensor:  # fp32 before scaling, so a 16-bit merge loses nothing more
        return state[name].to(torch.float32)

    attention_in = config.attention_in_multiplier
    gate, down = config.mlp_multipliers
    yield "token_embd.weight", weight("model.embed_tokens.weight") * config.embedding_multiplier
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        attention, mamba, mlp = f"{prefix}self_attn.", f"{prefix}mamba.", f"{prefix}feed_forward."
        yield f"blk.{i}.attn_norm.weight", weight(f"{prefix}input_layernorm.weight")  # feeds attention and Mamba
        yield f"blk.{i}.attn_q.weight", weight(f"{attention}q_proj.weight") * attention_in
        yield f"blk.{i}.attn_k.weight", weight(f"{attention}k_proj.weight") * (config.key_multiplier * attention_in)
        yield f"blk.{i}.attn_v.weight", weight(f"{attention}v_proj.weight") * attention_in
        yield f"blk.{i}.attn_output.weight", weight(f"{attention}o_proj.weight") * config.attention_out_multiplier
        yield f"blk.{i}.ssm_in.weight", weight(f"{mamba}in_proj.weight") * _ssm_in_scale(config)
        conv = weight(f"{mamba}conv1d.weight")  # (channels, 1, kernel)
        yield f"blk.{i}.ssm_conv1d.weight", conv.reshape(conv.shape[0], conv.shape[-1])
        # llama.cpp adds the conv bias unconditionally; zeros are what a conv without one adds
        bias = state.get(f"{mamba}conv1d.bias")
        yield f"blk.{i}.ssm_conv1d.bias", bias.to(torch.float32) if bias is not None else torch.zeros(conv.shape[0])
        yield f"blk.{i}.ssm_dt.bias", weight(f"{mamba}dt_bias")
        yield f"blk.{i}.ssm_a", -torch.exp(weight(f"{mamba}A_log")).reshape(-1, 1)
        yield f"blk.{i}.ssm_d", weight(f"{mamba}D").reshape(-1, 1)
        if config.mamba_rms_norm:  # optional in llama.cpp too: without it, the gate alone
            yield f"blk.{i}.ssm_norm.weight", weight(f"{mamba}norm.weight").reshape(config.mamba_n_groups, -1)
        yield f"blk.{i}.ssm_out.weight", weight(f"{mamba}out_proj.weight") * config.ssm_out_multiplier
        # no `.weight`: gguf-py maps `pre_ff_layernorm.weight` whole to FFN_PRE_NORM, and llama.cpp loads that name
        yield f"blk.{i}.ffn_norm", weight(f"{prefix}pre_ff_layernorm.weight")
        yield f"blk.{i}.ffn_gate.weight", weight(f"{mlp}gate_proj.weight") * gate
        yield f"blk.{i}.ffn_up.weight", weight(f"{mlp}up_proj.weight")
        yield f"blk.{i}.ffn_down.weight", weight(f"{mlp}down_proj.weight") * down
    yield "output_norm.weight", weight("model.final_layernorm.weight")
    yield "output.weight", weight("lm_head.weight") * config.lm_head_multiplier
