"""What differs between the model families this package fine-tunes, in one table keyed by config.json's `model_type`.

The rest of the package asks `architecture(config)` and reads the answer; it never branches on `model_type`
itself. Adding a family is adding a row here (docs/how-to/add-a-falcon.md walks through it), and the tests over
`ARCHITECTURES` then hold the new row to the same whole path as the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from lightning_falcon.errors import ConfigError
from lightning_falcon.upstream import falcon_linear_as_nn_linear


def _falcon_kv_heads(config) -> int:
    """Falcon's attention computes with one KV head under multi-query attention (7B), else `num_kv_heads`.

    transformers' FalconAttention ignores `num_kv_heads` unless `new_decoder_architecture` (40B, 180B, 11B) or not
    `multi_query`; a Falcon-7B config saved by transformers 5 says `num_kv_heads: 71` beside `multi_query: true`.
    """
    if config.new_decoder_architecture or not config.multi_query:
        return config.num_kv_heads
    return 1


def _key_value_heads(config) -> int:
    return config.num_key_value_heads


@dataclass(frozen=True)
class Architecture:
    """One model family, as this package treats it.

    Args:
        model_type: config.json's `model_type`.
        family: The models it covers, in words (errors and docs).
        lora_targets: The linear layers `model.target_modules: null` adapts: every projection of the block that
            LoRA reaches (the QLoRA paper adapts them all).
        keep_unquantized: Linear layers (leaf names) bitsandbytes must leave in the compute dtype, because a
            fused kernel reads their weight directly instead of calling the layer.
        not_lora: Layers LoRA must not target, for the same reason: the fused kernel would bypass the adapter.
        chat_template: The named template (`data/chat_templates.py`) that `data.chat_template: auto` takes when
            the tokenizer has none of its own.
        gguf: The llama.cpp architecture `export --format gguf` writes (`export/gguf.py`); None refuses GGUF.
        no_gguf: Why GGUF is refused, where `gguf` is None.
        logit_scale: The config attribute the output layer's logits are multiplied by (Falcon-H1's μP
            `lm_head_multiplier`), so that the chunked loss (`model/loss.py`) computes the model's own logits.
        packs_exactly: Whether packed batches (`data.batching: packed`) keep the rows apart. A Mamba layer's
            state runs on from one packed row into the next, where attention is masked per row.
        routes_attention: Whether `model.fused_attention` routes the attention (`model/attention.py`); the other
            families run transformers' own.
        shards_under_zero3: Whether DeepSpeed ZeRO-3 can shard the base. DeepSpeed gathers a module's weights only
            when that module runs, and Falcon-H1's fused Mamba kernels read `conv1d`'s, `norm`'s and `out_proj`'s
            weights without running them: under ZeRO-3 they would get an empty partition.
        mamba: Whether the blocks hold Mamba-2 mixers (the planner counts their activations).
        build: A context the model is built inside, so that transformers' quantizer sees its linear layers.
        kv_heads: The key/value heads the attention computes with, from the config.
    """

    model_type: str
    family: str
    lora_targets: tuple[str, ...]
    keep_unquantized: tuple[str, ...] = ()
    not_lora: tuple[str, ...] = ()
    chat_template: str = "instruction"
    gguf: str | None = None
    no_gguf: str = ""
    logit_scale: str | None = None
    packs_exactly: bool = True
    routes_attention: bool = False
    shards_under_zero3: bool = True
    mamba: bool = False
    build: Callable[[], AbstractContextManager] = contextlib.nullcontext
    kv_heads: Callable[[object], int] = _key_value_heads

    def head_dim(self, config) -> int:
        """The width of one attention head (Falcon3 and Falcon-H1 set it apart from hidden_size / heads)."""
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


FALCON = Architecture(
    model_type="falcon",
    family="Falcon (7B, 40B, 180B, Falcon2-11B)",
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    gguf="falcon",
    routes_attention=True,
    # Falcon's projections are `FalconLinear(nn.Linear)`, which transformers' quantizer passes over.
    build=falcon_linear_as_nn_linear,
    kv_heads=_falcon_kv_heads,
)

FALCON3 = Architecture(
    model_type="llama",
    family="Falcon3 (1B, 3B, 7B, 10B; LlamaForCausalLM)",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    chat_template="falcon3",
    gguf="llama",
)

FALCON_H1 = Architecture(
    model_type="falcon_h1",
    family="Falcon-H1 (0.5B to 34B; attention and Mamba-2 in parallel)",
    # On the state-space side only `in_proj`: the fused Mamba kernels read `out_proj`'s weight directly and take
    # `conv1d`'s as a tensor, so LoRA there is silently not applied (peft #2274, #2556; tiiuae/Falcon-H1 #13).
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "up_proj", "down_proj"),
    # A 4-bit `out_proj` crashes those kernels at the first step.
    keep_unquantized=("out_proj",),
    not_lora=("out_proj", "conv1d"),
    chat_template="falcon-h1",
    gguf="falcon-h1",
    logit_scale="lm_head_multiplier",
    packs_exactly=False,
    shards_under_zero3=False,
    mamba=True,
)

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (FALCON, FALCON3, FALCON_H1)}


def mamba_width(config) -> int:
    """A Falcon-H1 Mamba-2 mixer's inner width: `mamba_d_ssm`, else `mamba_expand` x hidden_size (as transformers)."""
    return config.mamba_d_ssm or int(config.mamba_expand * config.hidden_size)


def architecture(config) -> Architecture:
    """The table row of a model's config; a one-line error naming the supported families for any other."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    supported = "; ".join(f"{a.model_type}: {a.family}" for a in ARCHITECTURES.values())
    raise ConfigError(
        f"model_type {model_type!r} is not a supported architecture ({supported}). "
        "Fix: choose a model of one of these families, or add its row to lightning_falcon/architectures.py"
    )
