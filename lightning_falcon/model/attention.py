"""Attention over keys and values with fewer heads than the queries, on SDPA's fused kernels.

Falcon-7B has 71 query heads and one key/value head; Falcon-40B, -180B and Falcon2-11B have 8 key/value
groups. Handed to SDPA as they are, without `enable_gqa`, torch's fused kernels refuse mismatched head
counts and SDPA falls back to its math kernel, which builds every head's whole (query x key) score
matrix in fp32. transformers' Falcon instead copies 40B's keys and values to all 128 query heads. Here
each key/value head stays where it is, and `attend` picks, per call, the first of:

- `native`: the installed torch's fused kernels take one key/value head as it is (SDPA broadcasts it);
- `gqa`: `enable_gqa`, where the flash kernel accepts it for this call (on CPU, always; CUDA's takes no
  mask), except for one key/value head on CPU;
- `expand`: one key/value head, expanded to every query head as a zero-stride view (no copy);
- `groups`: one SDPA call per key/value group, each a zero-stride view for that group's query heads.

transformers' Falcon always hands attention a mask (its `create_causal_mask` never skips it), so on
CUDA the SDPA backend gets the memory-efficient kernel, which has no grouped mode: `expand` or `groups`.
Its backward still builds the gradient of the keys and values at every query head for a moment.

The memory-efficient kernel returns wrong values for zero-stride keys and values in 16 bits with a
boolean mask when the key length is 1 more than a multiple of 32 (pytorch/pytorch#191937). There one
masked key position is appended, which changes no output.

`model/module.py` installs this for the SDPA backend through `upstream.route_falcon_attention`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_falcon.upstream import cuda_flash_takes

Route = Literal["plain", "native", "expand", "gqa", "groups"]


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA of `query` (batch, heads, length, dim) over `key` and `value` (batch, kv_heads, kv_length, dim),
    `heads` a multiple of `kv_heads`, with no copy of a key/value head per query head. Returns
    (batch, heads, length, dim), the same as SDPA over keys and values repeated to every query head."""
    way = route(query, key, value, attn_mask, is_causal)
    if way == "gqa":
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True
        )
    if way != "plain" and wrong_on_efficient_kernel(query, key, attn_mask):
        key, value, attn_mask = with_masked_key(key, value, attn_mask)
    if way in ("plain", "native"):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal)
    return per_group(query, key, value, attn_mask, is_causal)


def route(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> Route:
    """Which way `attend` takes for these inputs (see the module docstring)."""
    heads, kv_heads, device = query.shape[-3], key.shape[-3], query.device.type
    if kv_heads == heads:
        return "plain"
    if kv_heads == 1 and takes_one_kv_head_natively(device):
        return "native"
    # On CPU, torch's flash kernel runs one zero-stride key/value head faster than its grouped mode.
    if not (kv_heads == 1 and device == "cpu") and gqa_is_fused(query, key, value, attn_mask, is_causal):
        return "gqa"
    return "expand" if kv_heads == 1 else "groups"


def per_group(query, key, value, attn_mask, is_causal) -> torch.Tensor:
    """One SDPA call per key/value group over that group's query heads, the group's key and value expanded to
    them as zero-stride views. One group (multi-query) is one call."""
    batch, heads, _, dim = query.shape
    kv_heads, kv_length = key.shape[-3], key.shape[-2]
    group = heads // kv_heads
    shape = (batch, group, kv_length, dim)
    per_head_mask = attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == heads > 1
    outputs = [
        F.scaled_dot_product_attention(
            query[:, g * group : (g + 1) * group],
            key[:, g : g + 1].expand(shape),
            value[:, g : g + 1].expand(shape),
            attn_mask=attn_mask[:, g * group : (g + 1) * group] if per_head_mask else attn_mask,
            is_causal=is_causal,
        )
        for g in range(kv_heads)
    ]
    return outputs[0] if kv_heads == 1 else torch.cat(outputs, dim=1)


def gqa_is_fused(query, key, value, attn_mask, is_causal) -> bool:
    """Whether SDPA with `enable_gqa` runs the flash kernel for these inputs, not the math one.

    CUDA answers through torch's own check. torch's CPU flash kernel takes grouped heads with or without a
    mask, and refuses only dropout, which Falcon's rotary attention never uses.
    """
    device = query.device.type
    if device == "cpu":
        return True
    if device != "cuda":
        return False
    # Only flash: SDPA tries cuDNN after the math kernel, so a cuDNN that would take it is never reached.
    return cuda_flash_takes(query, key, value, attn_mask, is_causal, enable_gqa=True)


@functools.cache
def takes_one_kv_head_natively(device_type: str) -> bool:
    """Whether this torch's fused kernels take a single key/value head against many query heads as it is,
    without `enable_gqa` (torch releases after 2.13; pytorch/pytorch#191085). Asked once per device type
    with tensors of a few bytes and a boolean mask, as Falcon calls it, SDPA restricted to its fused kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device_type == "cpu":
        backends = [SDPBackend.FLASH_ATTENTION]
    elif device_type == "cuda" and torch.cuda.is_available():
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    else:
        return False
    dtype = torch.float32 if device_type == "cpu" else torch.float16
    query = torch.zeros(1, 2, 8, 8, device=device_type, dtype=dtype)
    key = torch.zeros(1, 1, 8, 8, device=device_type, dtype=dtype)
    mask = torch.ones(8, 8, dtype=torch.bool, device=device_type).tril()
    try:
        with sdpa_kernel(backends), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns why each kernel declines before it raises
            F.scaled_dot_product_attention(query, key, key, attn_mask=mask)
    except RuntimeError:
        return False
    return True


def wrong_on_efficient_kernel(query, key, attn_mask) -> bool:
    """Whether zero-stride keys and values may meet pytorch/pytorch#191937 on CUDA's memory-efficient kernel:
    16-bit inputs, a boolean mask, and a key length of 1 more than a multiple of 32."""
    return (
        query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and attn_mask is not None
        and attn_mask.dtype == torch.bool
        and key.shape[-2] % 32 == 1
    )


def with_masked_key(key, value, attn_mask):
    """Keys and values with one more position that the mask hides from every query: the same attention."""
    pad = key.new_zeros(*key.shape[:-2], 1, key.shape[-1])
    key, value = torch.cat([key, pad], dim=-2), torch.cat([value, pad], dim=-2)
    hidden = attn_mask.new_zeros(*attn_mask.shape[:-1], 1)
    return key, value, torch.cat([attn_mask, hidden], dim=-1)


def default_implementation(device: torch.device, compute_dtype: torch.dtype) -> str:
    """transformers' attention backend for `model.attn_implementation: null`: `flash_attention_2` on a CUDA GPU that
    FlashAttention-2 runs on (compute capability 8.0 or later) with flash-attn installed (the `flash` extra) and
    16-bit compute, where packed batches need no mask; else `sdpa`."""
    from transformers.utils import is_flash_attn_2_available

    if (
        device.type == "cuda"
        and compute_dtype in (torch.float16, torch.bfloat16)
        and is_flash_attn_2_available()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    ):
        return "flash_attention_2"
    return "sdpa"


# ----------------------------------------------------------------- for the planner (no tensors)
@dataclass(frozen=True)
class Kernel:
    """The attention a config gets on a CUDA GPU, and what it holds beyond the layer's usual activations."""

    name: str
    score_bytes: int = 0  # bytes per (query, key) score built for every head; 0 for a fused kernel
    copied_kv: bool = False  # keys and values copied to every query head before the kernel
    expanded_grads: bool = False  # the backward builds the keys' and values' gradients at every query head


def gpu_kernel(heads: int, kv_heads: int, attn_implementation: str | None, fused: bool, compute_bytes: int) -> Kernel:
    """The kernel a run gets on a CUDA GPU with 16-bit inputs, through `attend` or transformers' own Falcon attention.

    None is `flash_attention_2` where flash-attn is installed and `sdpa` elsewhere (`default_implementation`);
    the planner cannot know which, so it names both and counts the larger.
    """
    grouped = kv_heads not in (1, heads)
    if attn_implementation is None:
        sdpa = gpu_kernel(heads, kv_heads, "sdpa", fused, compute_bytes)
        flash = gpu_kernel(heads, kv_heads, "flash_attention_2", fused, compute_bytes)
        return Kernel(
            f"{sdpa.name}; {flash.name} where the flash extra is installed",
            score_bytes=sdpa.score_bytes,  # flash-attn builds no score matrix
            copied_kv=sdpa.copied_kv or flash.copied_kv,
            expanded_grads=sdpa.expanded_grads,
        )
    kv = f"keys and values at {kv_heads} head{'s' if kv_heads > 1 else ''}"
    if attn_implementation == "eager":
        return Kernel("eager (the whole score matrix, in the compute dtype)", compute_bytes, copied_kv=grouped)
    if attn_implementation == "flash_attention_2":
        copied = ", copied to every head (transformers' own)" if grouped else ""
        return Kernel(f"flash-attn 2 ({kv}{copied})", copied_kv=grouped)
    if kv_heads == heads or fused:  # Falcon always passes a mask: the memory-efficient kernel
        return Kernel(f"SDPA memory-efficient kernel ({kv})", expanded_grads=kv_heads < heads)
    if kv_heads == 1:
        return Kernel("SDPA math kernel (the whole score matrix, in fp32): transformers' own attention", 4)
    return Kernel(
        f"SDPA memory-efficient kernel (keys and values copied to all {heads} heads: transformers' own)", copied_kv=True
    )
