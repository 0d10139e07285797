"""`export --format gguf`: one GGUF file that llama.cpp itself loads, tokenizes and generates from as
transformers does, and the Ollama Modelfile beside it.

The fast tier checks what needs no llama.cpp: the KV heads of each Falcon, the Modelfile's template
against training's prompt ids, and the refusals. The slow tier builds llama-cpp-python from its source
distribution once (`tests/llama_cpp_build.py`) and runs it on the exported tiny model; the scale tier on
a falcon-7b-shaped export.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import GUANACO, MIDJOURNEY, TINY, chat_format, prepared_datamodule

from lightning_falcon.data.chat_templates import NAMED
from lightning_falcon.data.source import Source
from lightning_falcon.errors import ConfigError
from lightning_falcon.export import gguf
from lightning_falcon.export.modelfile import PROMPT, SYSTEM, modelfile, template
from lightning_falcon.model.config import read_model_config
from lightning_falcon.model.generation import GenerationSettings, generate


@pytest.mark.parametrize("model, heads", [("asset:falcon-7b", 1), ("asset:falcon-40b", 8), ("asset:tiny-falcon", 1)])
def test_the_kv_heads_are_those_the_attention_computes_with(model, heads):
    config = read_model_config(model, False)
    assert gguf.kv_heads(config) == heads
    if model != "asset:falcon-40b":  # the trap: transformers' config says otherwise under multi-query attention
        assert config.multi_query and config.num_kv_heads == config.num_attention_heads != 1


def ollama(text: str, system: str | None, prompt: str) -> str:
    """What Ollama renders from a TEMPLATE of the one form ours take: `{{ if .System }}A{{ else }}B{{ end }}`."""
    if text.startswith("{{ if .System }}"):
        with_system, alone = text.removeprefix("{{ if .System }}").removesuffix("{{ end }}").split("{{ else }}")
        text = with_system.replace(SYSTEM, system) if system else alone
    return text.replace(PROMPT, prompt)


@pytest.mark.parametrize("name", ["tokenizer", *NAMED])
def test_the_modelfile_template_gives_the_ids_training_conditioned_on(tokenizer, name):
    for system in (None, "You are terse."):
        chat = chat_format(tokenizer, name, "messages", system=system)
        text = template(chat.describe(), tokenizer)
        for prompt in ("Midjourney prompt for a fantasy village at night", "mj prompt: a cat, 4k"):
            rendered = tokenizer(ollama(text, system, prompt), add_special_tokens=False)["input_ids"]
            assert rendered == chat.prompt_ids(tokenizer, prompt)


def test_the_modelfile_carries_the_system_prompt(tokenizer):
    chat = chat_format(tokenizer, "falcon-instruct", "messages", system="You are terse.")
    text = modelfile("m.gguf", chat.describe(), "<|endoftext|>", tokenizer)
    assert 'SYSTEM """You are terse."""' in text.splitlines()


def test_the_modelfile_template_of_a_turns_model_is_the_text_of_one_human_turn(tmp_path, tokenizer):
    dm = prepared_datamodule(tmp_path, dataset=Source(GUANACO, format="turns"))
    text = template(dm.prompt_format(), tokenizer).replace(PROMPT, "What is a falcon?")
    # The same text; Ollama tokenizes it whole, where training tokenized the turn and the marker apart.
    assert text == dm.tokenizer.decode(dm.encode_input("What is a falcon?"))


def test_what_llama_cpps_falcon_cannot_compute_is_refused_with_the_reason():
    config = read_model_config("asset:tiny-falcon", False)
    assert gguf.problems(config) == []
    config.alibi, config.bias = True, True
    found = gguf.problems(config)
    assert len(found) == 2 and "ALiBi" in found[0] and "biases" in found[1]


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused(tokenizer):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    assert gguf.pre_tokenizer(tokenizer) == "gpt-2"
    other = AutoTokenizer.from_pretrained(TINY)
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match=r"pre-tokenizer \(Whitespace\) is neither GPT-2's byte-level split"):
        gguf.pre_tokenizer(other)


def falcon_tokenizer(directory: Path):
    """A tiny BPE tokenizer trained, as tiiuae/falcon-7b's was, behind Falcon's pre-tokenizer (the one its
    tokenizer.json has), on the shipped data. Trained behind that split, it has no merge across it, as the
    real one has none; the tiny model's own tokenizer, trained behind GPT-2's, has ` 1` and such."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation("contiguous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), "isolated", invert=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    rows = [json.loads(line) for path in (MIDJOURNEY, GUANACO) for line in Path(path).read_text().splitlines()]
    texts = [r.get("text") or r["prompt"] + "\n" + r["response"] for r in rows]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def test_falcons_own_pre_tokenizer_is_named_falcon_for_llama_cpp(tmp_path):
    assert gguf.pre_tokenizer(falcon_tokenizer(tmp_path)) == "falcon"


# --------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="session")
def llama():
    """`tests/llama_cpp_build.py`: built once (minutes), then its `run`."""
    import llama_cpp_build

    llama_cpp_build.built()
    return llama_cpp_build.run


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> list[int]:
    """For each pair of continuations, how many tokens agree before the first difference (all: equal)."""
    return [
        next(
            (i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b),
            len(x) if len(x) == len(y) else min(len(x), len(y)),
        )
        for x, y in zip(ours, theirs, strict=False)
    ]


def logit_difference(model, sequences: list[list[int]], got: dict) -> float:
    """The relative difference of llama.cpp's logits to transformers' over every position of `sequences`."""
    with torch.no_grad():
        ours = torch.cat([model(torch.tensor([s])).logits[0] for s in sequences])
    theirs = torch.cat([torch.tensor(x) for x in got["logits"]])
    return float((theirs - ours).norm() / ours.norm())


def training_prompts(tokenizer, n: int) -> tuple[list[str], list[list[int]]]:
    """The first `n` Midjourney rows as the tiny config renders them (the `instruction` chat template): each row's
    text, and the ids generation starts from for its prompt."""
    chat = chat_format(tokenizer)
    rows = [json.loads(line) for line in Path(MIDJOURNEY).read_text(encoding="utf-8").splitlines()][:n]
    texts = [tokenizer.decode(chat.prompt_ids(tokenizer, r["prompt"])) + r["response"] for r in rows]
    return texts, [chat.prompt_ids(tokenizer, r["prompt"]) for r in rows]


@pytest.fixture(scope="module")
def exports(fitted, tmp_path_factory):
    """The 500-step tiny run exported as GGUF f32, f16, bf16 and q8_0, and merged as a transformers fp32 model."""
    from lightning_falcon.export.run import export

    _, run, _ = fitted
    out = tmp_path_factory.mktemp("gguf")
    adapter = str(run / "adapter")
    done = {t: export(adapter, str(out / t), format="gguf", gguf_type=t) for t in ("f32", "f16", "bf16", "q8_0")}
    done["merged"] = export(adapter, str(out / "merged"), merge=True, dtype="fp32")
    return done


def gguf_file(directory) -> str:
    (path,) = directory.glob("*.gguf")
    return str(path)


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_generates_the_exported_tiny_model_as_transformers_does(exports, tokenizer, llama):
    from transformers import AutoModelForCausalLM

    modelfile = (exports["f32"] / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{exports['f32'].name}-f32.gguf\n")
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "{{ .Prompt }}" in modelfile

    texts, prompts = training_prompts(tokenizer, 24)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.float32)
    ours = generate(merged, tokenizer, prompts[:6], GenerationSettings(max_new_tokens=32), 1)
    request = {"texts": texts, "prompts": prompts[:6], "new_tokens": 32, "score": ids[:6]}
    got = llama({"model": gguf_file(exports["f32"]), **request})

    assert got["n_vocab"] == 1024 and got["metadata"]["falcon.attention.head_count_kv"] == "1"
    assert got["metadata"]["tokenizer.chat_template"] == NAMED["instruction"]  # the tiny config's, not the tokenizer's
    assert '{{ else }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ end }}"""' in modelfile
    assert got["tokens"] == ids  # llama.cpp's tokenizer splits the training inputs as ours does
    difference = logit_difference(merged, ids[:6], got)
    agree = agreement(got["continuations"], [o.ids for o in ours])
    print(f"f32: relative logit difference {difference:.2e}; greedy tokens equal before the first difference: {agree}")
    # llama.cpp's fp32 model still takes some steps in lower precision (its GELU goes through an fp16 table):
    # measured 7.1e-4 here, of which emulating that table in transformers removes a quarter
    assert difference <= 1e-3
    assert all(o.new_tokens >= 16 for o in ours) and min(agree) >= 16


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_f16_bf16_and_q8_0_exports_load_and_follow_the_f32_answers(exports, tokenizer, llama, gguf_type):
    _, prompts = training_prompts(tokenizer, 6)
    got = llama({"model": gguf_file(exports[gguf_type]), "prompts": prompts, "new_tokens": 32})
    f32 = llama({"model": gguf_file(exports["f32"]), "prompts": prompts, "new_tokens": 32})
    agree = agreement(got["continuations"], f32["continuations"])
    print(f"{gguf_type}: tokens equal to f32's before the first difference: {agree}")
    assert min(agree) >= 16


@pytest.mark.slow
def test_a_grouped_kv_falcon_40b_layout_generates_in_llama_cpp_as_in_transformers(tmp_path, tokenizer, llama):
    """The 40B's layout (new_decoder_architecture: KV groups, ln_attn and ln_mlp) on a small random model."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
        new_decoder_architecture=True, multi_query=False, parallel_attn=True, bias=False, alibi=False,
        max_position_embeddings=512, initializer_range=0.15, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = FalconForCausalLM(config).eval()
    path = tmp_path / "grouped.gguf"
    gguf.write(model, tokenizer, path, "f32", "grouped")
    texts, prompts = training_prompts(tokenizer, 4)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16), 1)
    got = llama({"model": str(path), "prompts": prompts, "new_tokens": 16, "score": ids})
    assert got["metadata"]["falcon.attention.head_count_kv"] == "2"
    difference = logit_difference(model, ids, got)
    agree = agreement(got["continuations"], [o.ids for o in ours])
    print(f"40B layout: relative logit difference {difference:.2e}; greedy tokens equal for {agree}")
    # A wrong query-key-value order or norm would give unrelated logits, not a difference this small.
    assert difference <= 1e-3 and min(agree) >= 8


@pytest.mark.slow
def test_llama_cpp_renders_a_chat_through_the_ggufs_own_template_as_training_did(tmp_path, tokenizer, llama):
    """The tiny model with its tokenizer's template (falcon-7b-instruct's): llama.cpp's chat completion renders
    a request through the template the GGUF carries, to the ids training and `chat` generate from."""
    from transformers import AutoConfig, FalconForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "chat.gguf"
    gguf.write(FalconForCausalLM(AutoConfig.from_pretrained(TINY)).eval(), tokenizer, path, "f32", "chat")
    chat = chat_format(tokenizer, "tokenizer", "messages", system="You are terse.")
    history = [("What is the capital of France?", "Paris.")]
    asked = [chat.request("Name three primary colours."), chat.request("And of Italy?", history)]
    got = llama({"model": str(path), "chats": asked})
    assert got["metadata"]["tokenizer.chat_template"] == tokenizer.chat_template
    single, multi = got["chat_tokens"]
    assert single == chat.prompt_ids(tokenizer, "Name three primary colours.")
    # The history as training laid it out, but for the EOS training puts after each reply (the template has none)
    ours = chat.prompt_ids(tokenizer, "And of Italy?", history)
    assert ours.count(tokenizer.eos_token_id) == 1
    assert multi == [t for t in ours if t != tokenizer.eos_token_id]


@pytest.mark.slow
def test_llama_cpp_splits_text_as_falcons_own_pre_tokenizer_does(tmp_path, llama):
    """llama.cpp's `falcon` pre-tokenizer on a vocabulary trained behind Falcon's: the real Falcon tokenizer
    cannot be downloaded here, but its pre-tokenizer can be rebuilt."""
    from transformers import AutoConfig, FalconForCausalLM

    tokenizer = falcon_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = FalconForCausalLM(AutoConfig.from_pretrained(TINY)).eval()
    path = tmp_path / "falcon-split.gguf"
    gguf.write(model, tokenizer, path, "f32", "falcon-split")
    texts, _ = training_prompts(tokenizer, 8)
    texts += [
        "price: 12,345.67 in 2024, or 1234567 units",
        "Don't stop at 3.14159265!! (555) 123-4567 ext. 89...",
        "hello, world!! ...ok  two  spaces\tand a tab\nnewline 42",
        "--ar 16:9 --v 5.2 --q 2 --stylize 750, 8k, f/1.8",
    ]
    got = llama({"model": str(path), "texts": texts})
    assert got["metadata"]["tokenizer.ggml.pre"] == "falcon"
    assert got["tokens"] == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
