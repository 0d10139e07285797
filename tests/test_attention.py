"""Falcon's attention on SDPA's fused kernels (model/attention.py through upstream.route_falcon_attention).

Checked at the head layouts of Falcon-7B (71 query heads, one key/value head) and Falcon-40B (128 query
heads in 8 key/value groups), narrowed to 8 dimensions a head: the same logits and LoRA gradients as
transformers' eager attention for causal, padded and packed batches and a key length of 1 more than a
multiple of 32; a forward and backward that run with SDPA allowed only its flash kernel; and 40B's keys
and values reaching SDPA at their 8 groups.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from packaging.version import Version
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_falcon.architectures import FALCON
from lightning_falcon.assets import resolve
from lightning_falcon.data.batching import packed_attention_mask
from lightning_falcon.model.attention import attend, per_group, route, with_masked_key
from lightning_falcon.model.lora import apply_lora
from lightning_falcon.upstream import route_falcon_attention

HEAD_DIM = 8
VOCAB = 256


def falcon_config(size: str, layers: int = 2):
    """The shipped falcon-`size` config.json, `layers` layers, 8 dimensions a head and a small vocabulary."""
    from transformers import FalconConfig

    config = json.loads((Path(resolve(f"asset:falcon-{size}")) / "config.json").read_text())
    config.update(num_hidden_layers=layers, hidden_size=config["num_attention_heads"] * HEAD_DIM, vocab_size=VOCAB)
    return FalconConfig(**config)


def lora_falcon(size: str, attn: str, fused: bool):
    """A fp32 Falcon of that layout with LoRA on the four projections, its weights and adapters the same for a
    given `size` whatever the attention (seeded), every adapter nonzero so that every gradient is."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(falcon_config(size), attn_implementation=attn, dtype=torch.float32)
    if fused:
        assert route_falcon_attention(model, attend) == 2
    model = apply_lora(model, 4, 8, 0.0, FALCON.lora_targets, False, True)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def batch(kind: str, length: int) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    if kind == "causal":
        return {"input_ids": ids}
    if kind == "padded":  # the first row right-padded, the second left-padded
        mask = torch.ones(2, length, dtype=torch.long)
        mask[0, length - 5 :] = 0
        mask[1, :3] = 0
        return {"input_ids": ids, "attention_mask": mask}
    # packed: three examples in the first row, two in the second
    starts = [[0, 10, length // 2], [0, length - 7]]
    position_ids = torch.zeros(2, length, dtype=torch.long)
    for row, cuts in enumerate(starts):
        for begin, end in zip(cuts, [*cuts[1:], length], strict=True):
            position_ids[row, begin:end] = torch.arange(end - begin)
    return {"input_ids": ids, "position_ids": position_ids}


def logits_and_grads(model, inputs: dict, attn: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = dict(inputs)
    if "position_ids" in inputs:
        inputs["attention_mask"] = packed_attention_mask(inputs["position_ids"], attn, torch.float32)
    logits = model(**inputs, use_cache=False).logits
    targets = inputs["input_ids"][:, 1:].clone()
    if inputs.get("attention_mask") is not None and inputs["attention_mask"].dim() == 2:
        real = inputs["attention_mask"].bool()
        targets[~(real[:, :-1] & real[:, 1:])] = -100  # real tokens predicted from real tokens, as in training
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("size", ["7b", "40b"])
@pytest.mark.parametrize(("kind", "length"), [("causal", 64), ("padded", 64), ("packed", 64), ("padded", 65)])
def test_fused_attention_gives_eager_attentions_logits_and_lora_gradients(size, kind, length):
    inputs = batch(kind, length)
    ref_logits, ref_grads = logits_and_grads(lora_falcon(size, "eager", fused=False), inputs, "eager")
    logits, grads = logits_and_grads(lora_falcon(size, "sdpa", fused=True), inputs, "sdpa")
    if "attention_mask" in inputs:  # padding positions attend to nothing real: only real positions count
        real = inputs["attention_mask"].bool()
        ref_logits, logits = ref_logits[real], logits[real]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 2 * len(FALCON.lora_targets)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("size", ["7b", "40b"])
@pytest.mark.parametrize("kind", ["causal", "padded", "packed"])
def test_forward_and_backward_run_on_sdpas_flash_kernel_alone(size, kind):
    # transformers' own attention hands Falcon-7B's single key/value head to SDPA without enable_gqa,
    # which only the math kernel takes: this raised "No available kernel" before.
    model = lora_falcon(size, "sdpa", fused=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits, grads = logits_and_grads(model, batch(kind, 64), "sdpa")
    assert torch.isfinite(logits).all() and all(g.abs().max() > 0 for g in grads.values())


def sdpa_key_shapes(model, inputs) -> list[list[int]]:
    """The key shape of every SDPA call of one forward, as torch's profiler records it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(**inputs, use_cache=False)
    return [e.input_shapes[1] for e in prof.events() if e.name == "aten::scaled_dot_product_attention"]


def test_40b_keys_and_values_reach_sdpa_at_their_8_groups_not_copied_to_128_heads():
    inputs = batch("padded", 64)
    fused = sdpa_key_shapes(lora_falcon("40b", "sdpa", fused=True), inputs)
    upstream = sdpa_key_shapes(lora_falcon("40b", "sdpa", fused=False), inputs)
    assert fused == [[2, 8, 64, HEAD_DIM]] * 2
    assert upstream == [[2, 128, 64, HEAD_DIM]] * 2  # transformers' own: a copy per query head


def test_each_layout_takes_a_fused_way_on_cpu():
    from lightning_falcon.model.attention import takes_one_kv_head_natively

    q7, k7 = torch.zeros(1, 71, 4, HEAD_DIM), torch.zeros(1, 1, 4, HEAD_DIM)
    q40, k40 = torch.zeros(1, 128, 4, HEAD_DIM), torch.zeros(1, 8, 4, HEAD_DIM)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    if Version(torch.__version__).release[:2] <= (2, 13):  # refused as it is; a later torch may take it natively
        assert not takes_one_kv_head_natively("cpu")
    assert route(q7, k7, k7, mask) == ("native" if takes_one_kv_head_natively("cpu") else "expand")
    assert route(q40, k40, k40, mask) == "gqa"
    assert route(q40, q40, q40, mask) == "plain"


def repeated(key: torch.Tensor, heads: int) -> torch.Tensor:
    return key.repeat_interleave(heads // key.shape[1], dim=1)


@pytest.mark.parametrize("kv_heads", [1, 8])
def test_one_call_per_group_and_a_masked_extra_key_change_nothing(kv_heads):
    # The ways CUDA takes with a mask (memory-efficient kernel), run here on CPU: one SDPA call per key/value
    # group over zero-stride views, and the extra hidden key position that steers around pytorch#191937,
    # at a key length of 1 more than a multiple of 32 with a boolean mask.
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 16, 33, HEAD_DIM, generator=g)
    key, value = (torch.randn(2, kv_heads, 33, HEAD_DIM, generator=g) for _ in range(2))
    mask = torch.ones(2, 1, 33, 33, dtype=torch.bool).tril()
    mask[0, :, :, :4] = False
    mask[0, :, :4, 0] = True  # no query without a key to see
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(query, repeated(key, 16), repeated(value, 16), attn_mask=mask)
    torch.testing.assert_close(per_group(query, key, value, mask, False), expected, rtol=1e-5, atol=1e-6)
    padded_key, padded_value, padded_mask = with_masked_key(key, value, mask)
    assert padded_key.shape[-2] == 34 and padded_key.shape[-2] % 32 == 2
    got = per_group(query, padded_key, padded_value, padded_mask, False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_one_call_per_group_slices_a_mask_given_per_head():
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, 16, 9, HEAD_DIM, generator=g)
    key, value = (torch.randn(1, 4, 9, HEAD_DIM, generator=g) for _ in range(2))
    mask = torch.rand(1, 16, 9, 9, generator=g) > 0.3
    mask[..., 0] = True
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(query, repeated(key, 16), repeated(value, 16), attn_mask=mask)
    torch.testing.assert_close(per_group(query, key, value, mask, False), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("size", "kv_heads"), [("7b", 1), ("40b", 8)])
def test_a_decoding_step_with_the_cache_matches_the_whole_sequence(size, kv_heads):
    # Generation keeps keys and values in the cache at their own head count (8 groups for 40B, not 128).
    from transformers import DynamicCache

    model = lora_falcon(size, "sdpa", fused=True).eval()
    ids = batch("causal", 17)["input_ids"]
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert cache.layers[0].keys.shape[1] == kv_heads
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)


def test_flash_attention_2_is_the_default_only_on_an_ampere_gpu_with_flash_attn_and_16_bit_compute(monkeypatch):
    import transformers.utils
    from helpers import on_a_gpu

    from lightning_falcon.model.attention import default_implementation

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    on_a_gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert default_implementation(cuda, torch.bfloat16) == "sdpa"  # flash-attn not installed
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert default_implementation(cuda, torch.bfloat16) == default_implementation(cuda, torch.float16)
    assert default_implementation(cuda, torch.float16) == "flash_attention_2"
    assert default_implementation(cuda, torch.float32) == default_implementation(cpu, torch.bfloat16) == "sdpa"
    on_a_gpu(monkeypatch, (7, 5))  # a T4: FlashAttention-2 does not run there
    assert default_implementation(cuda, torch.float16) == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [1, 8])
@pytest.mark.parametrize("length", [64, 65])
def test_on_cuda_attend_matches_the_math_kernel_in_bf16_with_a_boolean_mask(kv_heads, length):
    # The memory-efficient kernel's case of pytorch#191937 (zero-stride keys, bf16, a boolean mask, key length
    # 65), and the way beside it, against fp32 math over keys and values repeated to every head.
    g = torch.Generator(device="cuda").manual_seed(4)
    query = torch.randn(2, 16, length, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(2, kv_heads, length, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    mask = torch.ones(2, 1, length, length, dtype=torch.bool, device="cuda").tril()
    mask[0, :, :, :5] = False
    mask[0, :, :5, 0] = True
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(
            query.float(), repeated(key, 16).float(), repeated(value, 16).float(), attn_mask=mask
        )
    torch.testing.assert_close(attend(query, key, value, mask).float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["7b", "40b"])
def test_on_cuda_the_model_runs_on_the_fused_kernels_alone_in_bf16(size):
    model = lora_falcon(size, "sdpa", fused=True).to("cuda", torch.bfloat16)
    for kind in ("causal", "padded"):
        inputs = {k: v.cuda() for k, v in batch(kind, 64).items()}
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            logits, grads = logits_and_grads(model, inputs, "sdpa")
        assert torch.isfinite(logits).all() and all(torch.isfinite(g).all() for g in grads.values()), kind
