"""Generation settings (the `generation:` section) and batched generation from token prompts.

One function generates for `predict`, `evaluate` and the samples logged during training, so all
three decode the same way: left-padded batches, EOS and pad ids from the tokenizer, and an output
that ends at the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lightning_falcon.data.conversations import without_marker
from lightning_falcon.data.tokenizer import special_ids, special_token_id
from lightning_falcon.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer


@dataclass
class GenerationSettings:
    """How text is generated, and for which inputs (`predict`, `evaluate` and samples during `fit`).

    Args:
        max_new_tokens: Most tokens generated per input; generation ends earlier at EOS.
        num_beams: Beam search width; 1 is greedy (or sampling, with `do_sample`).
        do_sample: Sample from the distribution instead of taking the most likely token.
        temperature: Softmax temperature when sampling (lower is more conservative).
        top_p: Nucleus sampling: draw from the smallest set of tokens whose probability reaches `top_p`.
        repetition_penalty: Above 1 discourages repeating tokens already present; 1 is off.
        samples: `fit`: inputs generated at every validation and logged to TensorBoard as text.
        inputs: `predict`: inputs given on the command line, e.g. `--generation.inputs '["a boy in the snow"]'`.
        input_file: `predict`: a file of inputs, JSONL (an `input` or `prompt` field per line) or plain text
            (one input per line).
        output: `predict`: the JSONL file written; default `predictions.jsonl` in the checkpoint's run directory.
        queries: `evaluate`: JSONL of `{"level": ..., "input": ...}` queries for the side-by-side report.
    """

    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    samples: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    input_file: str | None = None
    output: str | None = None
    queries: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}. Fix: e.g. 128")
        if self.num_beams < 1:
            problems.append(f"generation.num_beams must be >= 1, got {self.num_beams}. Fix: 1 (greedy or sampling)")
        if self.temperature <= 0:
            problems.append(f"generation.temperature must be > 0, got {self.temperature}. Fix: e.g. 0.7")
        if not 0 < self.top_p <= 1:
            problems.append(f"generation.top_p must be in (0, 1], got {self.top_p}. Fix: e.g. 0.9")
        if self.repetition_penalty <= 0:
            problems.append(
                f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}. Fix: 1.0 (none)"
            )
        if self.inputs and self.input_file:
            problems.append("generation.inputs and generation.input_file are both set. Fix: give one of them")
        ConfigError.collect(problems)

    def decoding(self) -> str:
        """How tokens are chosen, in words: greedy, beam search or sampling with its settings."""
        if self.do_sample:
            return f"sampling (temperature {self.temperature}, top_p {self.top_p})"
        return f"beam search ({self.num_beams} beams)" if self.num_beams > 1 else "greedy"

    def generate_kwargs(self) -> dict:
        """Keyword arguments of `model.generate`; sampling settings only when sampling (else transformers warns)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


@dataclass
class Generated:
    """One output: the text before the first EOS, how many tokens that is, whether EOS ended it, and its ids
    (without the EOS: what a conversation keeps of a reply)."""

    text: str
    new_tokens: int
    stopped_at_eos: bool
    ids: list[int] = field(default_factory=list, repr=False)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one width, so every row's next token is generated at the same position."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    return input_ids, attention_mask


def stop_ids(tokenizer: PreTrainedTokenizerBase, marker: str = "") -> list[int]:
    """The ids generation stops at: EOS, and the end `marker` of a reply where the tokenizer has it as one special
    token (Falcon-H1's `<|im_end|>`; `Rendering.marker`)."""
    marker_id = special_token_id(tokenizer, marker)
    return [tokenizer.eos_token_id] if marker_id is None else [tokenizer.eos_token_id, marker_id]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch_size: int,
    synced_gpus: bool = False,
    device: torch.device | None = None,
    streamer: BaseStreamer | None = None,
    marker: str = "",
) -> list[Generated]:
    """Generate for token prompts in left-padded batches of `batch_size`; the model's mode is restored after.

    `synced_gpus` keeps every rank stepping until all are done, which DeepSpeed ZeRO-3 needs: each forward
    gathers parameters from all ranks. `device` is where the inputs go (default: the first parameter's).
    `streamer` (transformers') receives the tokens as they are generated: one prompt, no beam search.
    `marker` is what a chat template ends a reply with (`Rendering.marker`): one special token of the tokenizer
    (Falcon-H1's `<|im_end|>`), which generation stops at as at EOS, or text before an EOS (ChatML's `<|im_end|>`
    on Falcon's tokenizer), which the text is cut at.
    """
    stops, pad = stop_ids(tokenizer, marker), special_ids(tokenizer)[1]
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off, LoRA's included
    results: list[Generated] = []
    try:
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = left_pad(prompts[start : start + batch_size], pad)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                eos_token_id=stops,
                pad_token_id=pad,
                use_cache=True,  # training switches the KV cache off in the model config
                synced_gpus=synced_gpus,
                streamer=streamer,
                **settings.generate_kwargs(),
            )
            for row in out[:, input_ids.shape[1] :].cpu():
                hits = torch.isin(row, torch.tensor(stops)).nonzero()
                n = int(hits[0]) if len(hits) else len(row)
                text = without_marker(tokenizer.decode(row[:n], skip_special_tokens=True).strip(), marker)
                results.append(Generated(text, n, bool(len(hits)), row[:n].tolist()))
    finally:
        model.train(was_training)
    return results
