"""The memory a QLoRA run needs on each GPU, counted from the model's config.json alone, for every strategy.

The model is built on the meta device (no weights, no memory) to count its parameters exactly: which
linear layers bitsandbytes quantizes, which parameters stay unquantized, and what LoRA adds.

The formula, per GPU, with N = devices x nodes, b = micro batch, s = max_length, h = hidden size,
L = layers, V = vocabulary, c = bytes of the compute dtype (2 for bf16/fp16, 4 for fp32):

* quantized base: for each quantized linear layer of n weights, nf4/fp4 pack n/2 bytes plus constants
  in blocks of 64 (double quantization: 1 byte per block + a second level of fp32 per 256 blocks + a
  256-entry fp32 code; without it: 4 bytes per block); int8 is n bytes + 4 per row. These are exactly
  what bitsandbytes allocates (checked against a real load in tests/test_plan.py).
  ZeRO-3 divides the packed weights by N; the constants stay whole on every GPU (they are attributes
  of the weight, not parameters DeepSpeed can partition).
* unquantized parameters (embeddings, norms, biases): 4 bytes each, because PEFT's
  prepare_model_for_kbit_training upcasts them to fp32 (c bytes with `model.upcast_frozen: false`);
  under DeepSpeed with bf16/fp16 precision DeepSpeed casts them back to 2 bytes. ZeRO-3 divides them by N.
* LoRA: r x (in + out) per adapted layer; 4 bytes of weight + 4 of gradient + 8 of AdamW state
  (paged 8-bit AdamW: 2, plus an fp32 scale per block of 256 for each of its two states).
  ZeRO-2 divides gradient and optimizer state by N, ZeRO-3 all three;
  offload moves gradient and optimizer state to CPU memory. DDP adds a bucket copy of the gradients.
* activations: L x b·s·h x 34 x c/2 without checkpointing (Korthikanti et al. 2022, "Reducing
  Activation Recomputation", eq. 1, with the 5·a·s/h attention-score term dropped because SDPA and
  flash attention do not store the scores); with checkpointing, L x b·s·h·c (each layer's input)
  plus one layer recomputed in full. Plus the logits: p·V x (c + 8) (the logits, their fp32
  log-probabilities for the loss and their gradient) for p positions: the batch's b·s with the model's
  own loss, one chunk of `model.loss_chunk_size` positions with the chunked loss (model/loss.py), which
  also keeps the final hidden states, b·s·h·c, as its checkpoint.
* attention, for a = query heads, by the kernel the run gets (`plan` names it; model/attention.py):
  a fused kernel keeps b·a·s x 4 bytes of log-sum-exp a layer; SDPA's math kernel (transformers' own
  Falcon-7B attention) keeps the probabilities, b·a·s² x 4 (fp32 whatever the inputs), and eager
  attention the same in c bytes, with the scores and then their gradients beside them for the layer
  in flight (3x). Keys and values copied to every head (transformers' own Falcon-40B attention) keep
  2·b·s·h·c more; those copies' gradients, or the gradients the memory-efficient kernel's backward
  builds at every head for keys and values it got as zero-stride views, are 2·b·s·h·c for the layer in
  flight. With checkpointing, one layer's; without, every layer keeps its part.
* Mamba-2 (Falcon-H1), for d = the mixer's inner width, g groups of state size n, H heads of width P,
  chunks of Q positions and a convolution of width k, from what mamba_ssm's fused kernel
  (`mamba_split_conv1d_scan_combined`) saves and recomputes: each layer keeps for backward its in_proj
  outputs and the scan's output, b·s·(2d + 2gn + H + d)·c; the layer in backward rebuilds the convolution's
  output and the gated norm's, b·s·(d + 2gn + d)·c, with the states between chunks, b·ceil(s/Q)·H·P·n x 4
  (fp32), and the step sizes, 2·b·H·s x 4. With checkpointing, one layer's of both; without, every layer's
  kept part and one layer's rebuilt part. Plus the state and convolution caches of generation (the samples
  during validation): L·b·(H·P·n + (d + 2gn)·k) x 4. Without mamba_ssm, transformers' PyTorch path holds
  more (it builds b·s·Q·H·n products at once), which the plan does not count.
* preference objectives (`model.objective`, model/preference.py): dpo, ipo and orpo train on pairs, each step one
  forward of 2b sequences (every chosen answer, then every rejected one), so the activations, attention, Mamba-2
  and logits rows count 2b sequences (the Mamba-2 generation caches stay at b: samples are generated b at a time).
  The answers' log-probabilities always go through the final hidden states and checkpointed chunks of the output
  layer (model/preference.py), so the logits row is the chunked loss's even with `loss_chunk_size: null` (then one
  chunk is the whole batch). dpo and ipo also run the reference (the same model, its adapter switched off, or a
  frozen copy of `model.adapter`: never a second base) forward without gradients, after the policy's forward and
  before its backward: nothing is saved for backward, so the reference holds one layer's working set, counted as
  the b'·s·h x 34 x c/2 a layer saves in training (an upper bound: without gradients a layer frees most of it
  as it goes) with its attention in flight (the scores and probabilities of a score-matrix kernel, 2·b'·a·s² at
  the kernel's bytes; copied keys and values, 2·b'·s·h·c; a fused kernel's log-sum-exp) and one Mamba-2 mixer's
  kept and rebuilt parts, plus the batch's final hidden states b'·s·h·c and one chunk of logits p·V x (c + 8)
  (bf16 logits, their fp32 copy and log-softmax), for b' = 2b. It is added to the rest like every other row,
  though it is gone before the policy's backward rebuilds its own layer and chunk: an overestimate by at most
  those. A frozen copy of `model.adapter` (dpo and ipo started from an adapter) adds 4 bytes per LoRA weight,
  divided by N under ZeRO-3. With `model.precompute_reference` the reference runs once before training (holding
  no gradients or optimizer state yet), and a step counts no reference forward. orpo has no reference.
* workspace: the largest quantized layer dequantized to the compute dtype (bitsandbytes does this
  for every matmul in training), ZeRO-3's gathered layers (the one computing and the one prefetched),
  and 1 GiB for the CUDA context, cuBLAS workspace and allocator slack (an assumption, not derived).
* load peak (ZeRO-3): each GPU first holds the whole model as fit builds it, before DeepSpeed partitions it
  (transformers cannot load a quantized model already partitioned; `model/placement.py`): the packed base
  and its constants, plus the larger of what the load holds beside them (the unquantized parameters and the
  largest weight, which transformers materialises in c bytes on the GPU before bitsandbytes packs it) and
  what the model holds once LoRA is added (the unquantized parameters as PEFT leaves them, 4 bytes or c with
  `upcast_frozen: false`, and the fp32 LoRA weights), plus the 1 GiB. More GPUs or nodes do not lower it.

Activations, attention, the Mamba-2 mixers, the reference forward and the 1 GiB are the approximate part; the
weight terms are exact counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lightning_falcon.architectures import architecture, mamba_width
from lightning_falcon.model.attention import Kernel, gpu_kernel
from lightning_falcon.model.lora import linear_module_names
from lightning_falcon.model.preference import PAIRED, REFERENCED

GiB = 2**30
STRATEGIES = ["single", "ddp", "deepspeed-zero2", "deepspeed-zero3", "deepspeed-zero3-offload"]
WORKSPACE_RESERVE = 1 * GiB  # CUDA context + cuBLAS workspace + allocator slack: an assumption


@dataclass
class ModelCount:
    """Parameter counts of an architecture, from its config alone."""

    quantized: list[tuple[int, int]]  # (in_features, out_features) of every linear layer bitsandbytes replaces
    unquantized: int  # every other parameter (embeddings, norms, biases, an untied lm_head), tied ones once
    lora: int  # LoRA parameters for the given rank and targets
    hidden: int
    layers: int
    vocab: int
    linear_modules: list[str]  # the leaf names LoRA can target
    heads: int = 1  # query heads of a layer
    kv_heads: int = 1  # key/value heads of a layer (Falcon-7B: 1; Falcon-40B: 8 groups)
    head_dim: int = 0  # width of one head (Falcon-H1's heads x head_dim is not the hidden size)
    routes_attention: bool = True  # model.fused_attention applies (Falcon); other families run transformers' own
    mamba: dict[str, int] = field(default_factory=dict)  # a Mamba-2 mixer's widths per block (Falcon-H1); else none

    @property
    def quantized_weights(self) -> int:
        return sum(i * o for i, o in self.quantized)


def count_model(config, target_modules: Sequence[str], lora_r: int, quantized: bool = True) -> ModelCount:
    """Build `config` on the meta device and count what each part holds. No weights are read or allocated."""
    from transformers import AutoModelForCausalLM

    family = architecture(config)
    with family.build(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # transformers leaves the output embedding unquantized (tied to the input embedding for Falcon-7B and 40B),
    # and the family's own `keep_unquantized` layers stay whole too.
    output = model.get_output_embeddings()
    layers, lora, in_linear = [], 0, set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and module is not output:
            if quantized and leaf not in family.keep_unquantized:
                layers.append((module.in_features, module.out_features))
                in_linear.add(id(module.weight))
            if leaf in target_modules:
                lora += lora_r * (module.in_features + module.out_features)
    unique = {id(p): p for p in model.parameters()}
    unquantized = sum(p.numel() for key, p in unique.items() if key not in in_linear)
    return ModelCount(
        quantized=layers,
        unquantized=unquantized,
        lora=lora,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        linear_modules=linear_module_names(model),
        heads=config.num_attention_heads,
        kv_heads=family.kv_heads(config),
        head_dim=family.head_dim(config),
        routes_attention=family.routes_attention,
        mamba=mamba_widths(config) if family.mamba else {},
    )


def mamba_widths(config) -> dict[str, int]:
    """A Falcon-H1 block's Mamba-2 mixer, from its config: inner width, groups, state size, heads, head width,
    chunk and convolution widths (the planner's d, g, n, H, P, Q, k)."""
    return {
        "d": mamba_width(config),
        "g": config.mamba_n_groups,
        "n": config.mamba_d_state,
        "H": config.mamba_n_heads,
        "P": config.mamba_d_head,
        "Q": config.mamba_chunk_size,
        "k": config.mamba_d_conv,
    }


def mamba_bytes(count: ModelCount, setup: Setup, sequences: int | None = None) -> float:
    """What the Mamba-2 mixers hold for backward, and their generation caches: see the module docstring.
    `sequences`: those of a training forward (a preference objective's 2 per pair); None: the batch size."""
    m = count.mamba
    b, s, c = sequences or setup.batch_size, setup.max_length, setup.compute_bytes
    d, gn = m["d"], m["g"] * m["n"]
    kept = b * s * (2 * d + 2 * gn + m["H"] + d) * c  # in_proj's outputs and the scan's output, saved per layer
    rebuilt = b * s * (d + 2 * gn + d) * c  # the convolution's and the gated norm's outputs, recomputed in backward
    rebuilt += b * math.ceil(s / m["Q"]) * m["H"] * m["P"] * m["n"] * 4 + 2 * b * m["H"] * s * 4
    caches = count.layers * setup.batch_size * (m["H"] * m["P"] * m["n"] + (d + 2 * gn) * m["k"]) * 4
    return (kept if setup.gradient_checkpointing else count.layers * kept) + rebuilt + caches


def quantized_layer_bytes(n: int, out_features: int, quantization: str, double_quant: bool) -> tuple[int, int]:
    """(weight bytes, constant bytes) bitsandbytes allocates for one linear layer of `n` weights."""
    if quantization == "int8":
        return n, 4 * out_features
    blocks = math.ceil(n / 64)
    # double: uint8 absmax + fp32 absmax of the absmax per 256 blocks + its 256-entry code + nf4 code;
    # single: fp32 absmax per block + the 16-entry code
    constants = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 if double_quant else 4 * blocks + 4 * 16
    return math.ceil(n / 2), constants


@dataclass
class Setup:
    """What the planner needs from a run's config."""

    quantization: str = "nf4"
    double_quant: bool = True
    compute_bytes: int = 2
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"
    batch_size: int = 1
    max_length: int = 512
    world_size: int = 1
    mixed_16bit: bool = True  # trainer precision is bf16/fp16 (DeepSpeed then keeps parameters in 16 bits)
    upcast_frozen: bool = True  # frozen unquantized weights in fp32 (PEFT's prepare_model_for_kbit_training)
    loss_chunk_size: int | None = None  # positions per chunk of the loss; None: the whole batch's logits at once
    attn_implementation: str | None = None  # transformers' attention backend; None: sdpa
    fused_attention: bool = True  # model.fused_attention: keys and values at their own head count (model/attention.py)
    objective: str = "sft"  # model.objective: dpo, ipo and orpo train on pairs (model/preference.py)
    reference_adapter: bool = False  # dpo/ipo started from model.adapter: a frozen copy of it is the reference
    precompute_reference: bool = False  # model.precompute_reference: the reference runs once, before training

    @property
    def sequences(self) -> int:
        """The sequences of one training forward: a pair is two (chosen and rejected)."""
        return self.batch_size * (2 if self.objective in PAIRED else 1)

    @property
    def reference_forward(self) -> bool:
        """Each training step also runs the reference's forward (dpo and ipo, unless it was precomputed)."""
        return self.objective in REFERENCED and not self.precompute_reference


@dataclass
class Plan:
    strategy: str
    rows: dict[str, float] = field(default_factory=dict)  # component -> bytes per GPU
    load_peak: float = 0.0  # bytes per GPU while loading, before DeepSpeed shards the base

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def plan(count: ModelCount, setup: Setup, strategy: str) -> Plan:
    """Per-GPU bytes of each component for one strategy (see the module docstring for the formula)."""
    n = setup.world_size if strategy != "single" else 1
    c = setup.compute_bytes
    zero = {"deepspeed-zero2": 2, "deepspeed-zero3": 3, "deepspeed-zero3-offload": 3}.get(strategy, 0)
    offload = strategy.endswith("offload")

    if setup.quantization == "none":
        weights, constants = count.quantized_weights * c, 0
        unquantized = count.unquantized * c
    else:
        parts = [quantized_layer_bytes(i * o, o, setup.quantization, setup.double_quant) for i, o in count.quantized]
        weights, constants = sum(w for w, _ in parts), sum(k for _, k in parts)
        frozen_bytes = 4 if setup.upcast_frozen else c
        unquantized = count.unquantized * (2 if zero and setup.mixed_16bit else frozen_bytes)
    # bitsandbytes' 8-bit AdamW: two uint8 states, each with an fp32 absmax per block of 256
    optimizer_bytes = 2 + 2 * 4 / 256 if setup.optimizer == "paged_adamw_8bit" else 8
    lora_param, lora_grad, lora_optim = 4 * count.lora, 4 * count.lora, optimizer_bytes * count.lora

    p = Plan(strategy)
    p.rows["quantized base weights"] = 0 if offload else weights / (n if zero == 3 else 1)
    p.rows["quantization constants"] = constants
    p.rows["unquantized parameters"] = 0 if offload else unquantized / (n if zero == 3 else 1)
    p.rows["LoRA parameters"] = lora_param / (n if zero == 3 else 1)
    p.rows["LoRA gradients"] = 0 if offload else lora_grad / (n if zero >= 2 else 1)
    if strategy == "ddp":
        p.rows["LoRA gradients"] += lora_grad  # DDP's gradient buckets
    p.rows["LoRA optimizer states"] = 0 if offload else lora_optim / (n if zero >= 2 else 1)
    reference_adapter = setup.reference_adapter and setup.objective in REFERENCED
    if reference_adapter:  # the frozen copy of model.adapter, in fp32 as the trained one (no gradient, no state)
        p.rows["reference adapter"] = lora_param / (n if zero == 3 else 1)

    b, s, h, L = setup.sequences, setup.max_length, count.hidden, count.layers
    per_layer = 34 * b * s * h * c / 2
    if setup.gradient_checkpointing:
        p.rows["activations"] = L * b * s * h * c + per_layer
    else:
        p.rows["activations"] = L * per_layer
    p.rows["attention"] = attention_bytes(count, replace(setup, batch_size=b))
    if count.mamba:
        p.rows["Mamba-2 mixers"] = mamba_bytes(count, setup, b)
    positions = b * s
    chunk = setup.loss_chunk_size
    if chunk is None and setup.objective in PAIRED:  # pairs are scored from the hidden states, one chunk of all
        chunk = positions
    if chunk is None:
        p.rows["logits"] = positions * count.vocab * (c + 8)
    else:
        p.rows["logits"] = min(chunk, positions) * count.vocab * (c + 8) + positions * h * c
    if setup.reference_forward:
        p.rows["reference forward"] = reference_forward_bytes(count, setup)

    largest = max((i * o for i, o in count.quantized), default=0)
    workspace = largest * c + WORKSPACE_RESERVE
    if zero == 3:  # the layer computing and the one prefetched, gathered whole
        per_block = weights / max(L, 1)
        workspace += 2 * per_block
    p.rows["workspace"] = workspace
    # Under ZeRO-3 a quantized base loads whole onto every GPU (an unquantized one loads partitioned, under zero.Init)
    if zero == 3 and setup.quantization != "none":
        loading = count.unquantized * c + largest * c  # the last weight materialised in c bytes before it is packed
        lora_copies = 2 if reference_adapter else 1  # the trained adapter, and the reference's frozen copy
        built = count.unquantized * (4 if setup.upcast_frozen else c) + 4 * count.lora * lora_copies  # before casts
        p.load_peak = weights + constants + max(loading, built) + WORKSPACE_RESERVE
    return p


def peak(p: Plan) -> float:
    """The most a GPU holds at any time under plan `p`: training, or loading where that is more (ZeRO-3)."""
    return max(p.total, p.load_peak)


@dataclass
class NodeCount:
    """The fewest nodes at which a strategy fits a GPU, or why no node count does."""

    nodes: int | None  # the fewest nodes of the given GPUs each; None: no node count fits
    plan: Plan  # the plan at that node count; with no fit, the plan as the node count grows without bound


UNBOUNDED = 2**40  # GPUs standing for "as many as you like": every row the strategy divides is then ~0


def fewest_nodes(count: ModelCount, setup: Setup, strategy: str, devices: int, gpu_memory: float) -> NodeCount:
    """The fewest nodes of `devices` GPUs each at which `strategy` fits `gpu_memory` bytes per GPU.

    Beyond one node every row only shrinks as GPUs are added, so the rows a strategy does not divide (and the
    ZeRO-3 load peak) are a floor no node count goes below: above `gpu_memory`, no node count fits.
    """

    def at(gpus: int) -> Plan:
        name = "ddp" if strategy == "single" and gpus > 1 else strategy  # Lightning's choice for several devices
        return plan(count, replace(setup, world_size=gpus), name)

    one = at(devices)
    if peak(one) <= gpu_memory:
        return NodeCount(1, one)
    floor = at(UNBOUNDED)
    if peak(floor) > gpu_memory:
        return NodeCount(None, floor)
    low, high = 1, 2  # it does not fit at `low` nodes; the search doubles `high` until it does
    while peak(at(devices * high)) > gpu_memory:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if peak(at(devices * middle)) <= gpu_memory else (middle, high)
    return NodeCount(high, at(devices * high))


def attention_kernel(count: ModelCount, setup: Setup) -> Kernel:
    """The attention kernel the run gets on a CUDA GPU."""
    fused = setup.fused_attention and count.routes_attention
    return gpu_kernel(count.heads, count.kv_heads, setup.attn_implementation, fused, setup.compute_bytes)


def attention_bytes(count: ModelCount, setup: Setup) -> float:
    """What attention holds beyond the layer activations: see the module docstring."""
    kernel = attention_kernel(count, setup)
    b, s, a, c = setup.batch_size, setup.max_length, count.heads, setup.compute_bytes
    every_head = 2 * b * s * a * count.head_dim * c  # keys and values at every query head
    if kernel.score_bytes:  # the probabilities kept for backward; beside them the scores, then their gradients
        kept = b * a * s * s * kernel.score_bytes
        in_flight = 2 * kept
    else:  # a fused kernel keeps one fp32 log-sum-exp per query and head
        kept, in_flight = b * a * s * 4, 0
    if kernel.copied_kv:
        kept += every_head
    if kernel.copied_kv or kernel.expanded_grads:  # the keys' and values' gradients at every head
        in_flight += every_head
    return kept + in_flight if setup.gradient_checkpointing else count.layers * kept + in_flight


def reference_forward_bytes(count: ModelCount, setup: Setup) -> float:
    """What the reference's forward without gradients holds at once, for a batch of pairs: one layer's working set
    and its attention (and Mamba-2 mixer) in flight, the final hidden states, one chunk of logits. An estimate:
    see the module docstring."""
    kernel = attention_kernel(count, setup)
    b, s, h, a, c = setup.sequences, setup.max_length, count.hidden, count.heads, setup.compute_bytes
    layer = 34 * b * s * h * c / 2  # what a layer saves in training: more than it holds at once without gradients
    # a score-matrix kernel's scores and the probabilities beside them; a fused kernel's log-sum-exp
    attention = 2 * b * a * s * s * kernel.score_bytes if kernel.score_bytes else b * a * s * 4
    if kernel.copied_kv:
        attention += 2 * b * s * a * count.head_dim * c
    mixer = 0.0
    if count.mamba:  # one layer's kept and rebuilt parts, as mamba_bytes counts them with checkpointing; no caches
        mixer = mamba_bytes(replace(count, layers=0), replace(setup, gradient_checkpointing=True), b)
    positions = b * s
    chunk = min(setup.loss_chunk_size or positions, positions)
    return layer + attention + mixer + positions * h * c + chunk * count.vocab * (c + 8)


def activation_bytes(count: ModelCount, setup: Setup, checkpointing: bool) -> float:
    """Activations + attention + logits for the batch (+ the reference's forward where a step runs it), with or
    without checkpointing (for the comparison line)."""
    p = plan(count, replace(setup, gradient_checkpointing=checkpointing), "single")
    return (
        p.rows["activations"]
        + p.rows["attention"]
        + p.rows.get("Mamba-2 mixers", 0)
        + p.rows["logits"]
        + p.rows.get("reference forward", 0)
    )
