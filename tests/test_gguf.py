"""`export --format gguf`: one GGUF file that llama.cpp itself loads, tokenizes and generates from as
transformers does, and the Ollama Modelfile beside it, for each family's llama.cpp architecture (`falcon`;
Falcon3 as `llama`; Falcon-H1 as `falcon-h1`).

The fast tier checks what needs no llama.cpp: the KV heads of each Falcon, the tensor names each architecture's
writer gives against gguf's own, Falcon-H1's folded multipliers against transformers, the tensor types, the
Modelfile's template against training's prompt ids, and the refusals. The slow tier builds llama-cpp-python from
its source distribution once (`tests/llama_cpp_build.py`) and runs it on the exported tiny models; the scale tier
on a falcon-7b-shaped export.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import GUANACO, MIDJOURNEY, TINY, TINY_FAMILIES, chat_format, fit_in_process, prepared_datamodule

from lightning_falcon import architectures
from lightning_falcon.data.chat_templates import NAMED
from lightning_falcon.data.source import Source
from lightning_falcon.errors import ConfigError
from lightning_falcon.export import gguf, gguf_falcon_h1
from lightning_falcon.export.modelfile import PROMPT, SYSTEM, modelfile, template
from lightning_falcon.model.config import read_model_config
from lightning_falcon.model.generation import GenerationSettings, generate


@pytest.mark.parametrize("model, heads", [("asset:falcon-7b", 1), ("asset:falcon-40b", 8), ("asset:tiny-falcon", 1)])
def test_the_kv_heads_are_those_the_attention_computes_with(model, heads):
    config = read_model_config(model, False)
    assert architectures.architecture(config).kv_heads(config) == heads
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


# --------------------------------------------------------------------------- each architecture's writer
TINY_MODELS = {"falcon": TINY, **TINY_FAMILIES}


def tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_MODELS[family], dtype=torch.float32).eval()


def test_the_table_names_llama_cpp_architectures_that_have_a_writer():
    from gguf.constants import MODEL_ARCH_NAMES

    named = {row.gguf for row in architectures.ARCHITECTURES.values()} - {None}
    assert named <= set(gguf.WRITERS) and set(gguf.WRITERS) <= set(MODEL_ARCH_NAMES.values())


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_every_tensor_written_is_one_that_llama_cpps_architecture_has(family):
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    model = tiny_model(family)
    arch = architectures.architecture(model.config).gguf
    (key,) = [k for k, name in MODEL_ARCH_NAMES.items() if name == arch]
    theirs = {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[key] for i in range(model.config.num_hidden_layers)}
    written = [name for name, _ in gguf.WRITERS[arch].tensors(model)]
    assert len(written) == len(set(written))
    assert {name.removesuffix(".weight").removesuffix(".bias") for name in written} <= theirs


def test_falcon_h1s_multipliers_folded_into_the_weights_leave_its_logits():
    """llama.cpp's falcon-h1 graph has no multiplier: the weights as written, loaded back into a Falcon-H1 whose
    multipliers are all 1, compute the shipped model's logits."""
    from transformers import FalconH1ForCausalLM

    model = tiny_model("falcon-h1")
    assert model.config.embedding_multiplier != 1 and model.config.ssm_multipliers != [1.0] * 5
    written = dict(gguf_falcon_h1.tensors(model))
    ones = {name: 1.0 for name in ("embedding_multiplier", "lm_head_multiplier", "key_multiplier")}
    ones |= {f"{part}_multiplier": 1.0 for part in ("attention_in", "attention_out", "ssm_in", "ssm_out")}
    plain = FalconH1ForCausalLM(
        dataclasses.replace(model.config, **ones, mlp_multipliers=[1.0, 1.0], ssm_multipliers=[1.0] * 5)
    ).eval()
    back = {"model.embed_tokens.weight": "token_embd.weight", "model.final_layernorm.weight": "output_norm.weight"}
    back["lm_head.weight"] = "output.weight"
    layer = {
        "input_layernorm.weight": "attn_norm.weight", "pre_ff_layernorm.weight": "ffn_norm",
        "mamba.in_proj.weight": "ssm_in.weight", "mamba.conv1d.bias": "ssm_conv1d.bias", "mamba.dt_bias": "ssm_dt.bias",
        "mamba.out_proj.weight": "ssm_out.weight", "self_attn.o_proj.weight": "attn_output.weight",
        **{f"self_attn.{x}_proj.weight": f"attn_{x}.weight" for x in "qkv"},
        **{f"feed_forward.{x}_proj.weight": f"ffn_{x}.weight" for x in ("gate", "up", "down")},
    }  # fmt: skip
    state = {}
    for i in range(model.config.num_hidden_layers):
        back |= {f"model.layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in layer.items()}
        state[f"model.layers.{i}.mamba.conv1d.weight"] = written[f"blk.{i}.ssm_conv1d.weight"].unsqueeze(1)
        state[f"model.layers.{i}.mamba.A_log"] = torch.log(-written[f"blk.{i}.ssm_a"]).flatten()
        state[f"model.layers.{i}.mamba.D"] = written[f"blk.{i}.ssm_d"].flatten()
        state[f"model.layers.{i}.mamba.norm.weight"] = written[f"blk.{i}.ssm_norm.weight"].flatten()
    state |= {ours: written[theirs] for ours, theirs in back.items()}
    plain.load_state_dict(state, strict=True)
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_tensor_types_follow_llama_cpps_converter(tmp_path):
    """q8_0: the Mamba conv, ssm_a, ssm_d and every norm stay f32; a row q8_0 cannot split into blocks of 32
    (Falcon3's down projection here, at an intermediate width of 80) falls back to f16, as the converter does."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tmp_path / "h1.gguf"
    gguf.write(tiny_model("falcon-h1"), AutoTokenizer.from_pretrained(TINY_FAMILIES["falcon-h1"]), path, "q8_0", "h1")
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    kept = ["ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_a", "ssm_d", "ssm_norm.weight", "ssm_dt.bias", "ffn_norm"]
    assert {types[f"blk.1.{name}"] for name in [*kept, "attn_norm.weight"]} == {Q.F32}
    assert {types[f"blk.1.{name}"] for name in ("ssm_in.weight", "attn_k.weight", "ffn_down.weight")} == {Q.Q8_0}

    config = dataclasses.replace(tiny_model("falcon3").config, intermediate_size=80)
    path = tmp_path / "falcon3.gguf"
    gguf.write(LlamaForCausalLM(config), AutoTokenizer.from_pretrained(TINY_FAMILIES["falcon3"]), path, "q8_0", "f3")
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.0.ffn_up.weight"]) == (Q.F16, Q.Q8_0)


def test_what_llama_cpps_llama_and_falcon_h1_cannot_compute_is_refused_with_the_reason():
    falcon3 = read_model_config("asset:tiny-falcon3", False)
    assert gguf.problems(falcon3) == []
    falcon3.mlp_bias, falcon3.rope_parameters = True, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    found = gguf.problems(falcon3)
    assert len(found) == 2 and "biases" in found[0] and "rotary positions (linear)" in found[1]
    h1 = read_model_config("asset:tiny-falcon-h1", False)
    assert gguf.problems(h1) == []
    h1.mamba_norm_before_gate, h1.time_step_limit = True, (0.001, 0.1)
    found = gguf.problems(h1)
    assert len(found) == 2 and "norm comes before its gate" in found[0] and "time step" in found[1]


def test_export_refuses_gguf_for_a_family_the_table_gives_none_in_one_line_before_loading(tmp_path, monkeypatch):
    from lightning_falcon.export import run

    row = dataclasses.replace(architectures.FALCON_H1, gguf=None, no_gguf="its Mamba state has no llama.cpp form")
    monkeypatch.setitem(architectures.ARCHITECTURES, "falcon_h1", row)
    monkeypatch.setattr(run, "_merge", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    meta = {"base": TINY_FAMILIES["falcon-h1"], "quantization": "nf4", "prompt": {"format": "chat"}}
    (adapter / "lightning_falcon.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as refused:
        run.export(str(adapter), str(tmp_path / "out"), format="gguf")
    assert str(refused.value) == (
        f"GGUF cannot hold {row.family} as transformers runs it: its Mamba state has no llama.cpp form. "
        "Fix: export without --format gguf"
    )
    assert not (tmp_path / "out").exists()


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


@pytest.fixture(scope="module")
def family_exports(tmp_path_factory):
    """family -> configs/tiny.yaml on that family's tiny model (and its tokenizer), trained 30 steps in this process,
    exported as GGUF f32 and q8_0 and merged as a transformers fp32 model: the directories by name."""
    from lightning_falcon.export.run import export

    done = {}

    def get(family: str) -> dict[str, Path]:
        if family not in done:
            root, path = tmp_path_factory.mktemp(f"gguf-{family}"), TINY_FAMILIES[family]
            steps = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "30"]
            steps += ["--generation.max_new_tokens", "8"]  # the validation sample, kept short
            run = fit_in_process(root, "--model.model_name_or_path", path, "--data.tokenizer", path, *steps)
            adapter = str(run / "adapter")
            done[family] = {t: export(adapter, str(root / t), format="gguf", gguf_type=t) for t in ("f32", "q8_0")}
            done[family]["merged"] = export(adapter, str(root / "merged"), merge=True, dtype="fp32")
        return done[family]

    return get


def expected_metadata(config) -> dict[str, str]:
    """The hyperparameters llama.cpp must read for the model's architecture, as its metadata prints them."""
    row = architectures.architecture(config)
    shape = {
        "block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
        "attention.head_count": config.num_attention_heads, "attention.head_count_kv": row.kv_heads(config),
        "attention.key_length": row.head_dim(config), "attention.value_length": row.head_dim(config),
    }  # fmt: skip
    if row.mamba:
        width = config.mamba_d_ssm
        shape |= {
            "ssm.inner_size": width,
            "ssm.state_size": config.mamba_d_state,
            "ssm.conv_kernel": config.mamba_d_conv,
        }
        shape |= {"ssm.group_count": config.mamba_n_groups, "ssm.time_step_rank": width // config.mamba_d_head}
    return {"general.architecture": row.gguf} | {f"{row.gguf}.{key}": str(value) for key, value in shape.items()}


def departures(
    model, eos: int, prompts: list[list[int]], ours: list[list[int]], theirs: list[list[int]]
) -> list[float]:
    """For each pair of greedy continuations (EOS left off), by how much transformers' logit for its own token led
    its logit for llama.cpp's token where the two first differ (0 where they never do): the near-tie a rounding
    flipped."""
    gaps = []
    for prompt, x, y in zip(prompts, ours, theirs, strict=True):
        if x == y:
            gaps.append(0.0)
            continue
        x, y = [*x, eos], [*y, eos]  # where one stopped and the other did not, the one chose EOS
        at = next(i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + x[:at]])).logits[0, -1]
        gaps.append(float(logits[x[at]] - logits[y[at]]))
    return gaps


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_falcon3_and_falcon_h1_exports_generate_in_llama_cpp_as_in_transformers(family_exports, llama, family):
    """The real path: fit on the family's tiny model, `export --format gguf`, and llama.cpp's `llama` (Falcon3) or
    `falcon-h1` computes what the merged transformers model computes, μP multipliers and all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = family_exports(family)
    tokenizer = AutoTokenizer.from_pretrained(TINY_FAMILIES[family])
    texts, prompts = training_prompts(tokenizer, 8)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    merged = AutoModelForCausalLM.from_pretrained(done["merged"], dtype=torch.float32)
    ours = [o.ids for o in generate(merged, tokenizer, prompts, GenerationSettings(max_new_tokens=32), 1)]
    got = llama({"model": gguf_file(done["f32"]), "texts": texts, "prompts": prompts, "new_tokens": 32, "score": ids})

    expected = expected_metadata(merged.config)
    assert {key: got["metadata"][key] for key in expected} == expected
    assert got["n_vocab"] == merged.config.vocab_size
    assert got["tokens"] == ids  # llama.cpp's tokenizer splits the training inputs as ours does
    difference = logit_difference(merged, ids, got)
    equal = sum(x == y for x, y in zip(ours, got["continuations"], strict=True))
    gaps = departures(merged, got["eos"], prompts, ours, got["continuations"])
    tokens = sum(map(len, ours))
    print(
        f"{family} f32: relative logit difference {difference:.2e}; greedy continuations equal: {equal} of {len(ours)}"
    )
    print(f"{family} f32: {tokens} tokens generated; largest logit gap where a continuation differs: {max(gaps):.1e}")
    # llama.cpp keeps its KV cache in f16 (its default), which most of the difference is
    assert difference <= 2e-3
    # logits here span about ±5: llama.cpp departs only where transformers' top two are within its error
    assert max(gaps) <= 5e-3 and equal >= len(ours) - 1


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_q8_0_exports_of_falcon3_and_falcon_h1_load_and_follow_transformers(family_exports, llama, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = family_exports(family)
    tokenizer = AutoTokenizer.from_pretrained(TINY_FAMILIES[family])
    texts, prompts = training_prompts(tokenizer, 6)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    merged = AutoModelForCausalLM.from_pretrained(done["merged"], dtype=torch.float32)
    ours = [o.ids for o in generate(merged, tokenizer, prompts, GenerationSettings(max_new_tokens=32), 1)]
    got = llama({"model": gguf_file(done["q8_0"]), "prompts": prompts, "new_tokens": 32, "score": ids})
    difference = logit_difference(merged, ids, got)
    gaps = departures(merged, got["eos"], prompts, ours, got["continuations"])
    agree = agreement(got["continuations"], ours)
    print(f"{family} q8_0: relative logit difference {difference:.2e}; tokens equal before a difference: {agree}")
    print(f"{family} q8_0: largest logit gap where a continuation differs: {max(gaps):.1e}")
    # q8_0 rounds each weight to 1/127 of its block's largest: about 2% of the logits, single ones by up to 0.3
    assert difference <= 0.04 and max(gaps) <= 0.3


def random_family_model(family: str):
    """A small random model of the family in the layouts the shipped tiny ones leave out: a head width apart from
    hidden_size / heads, a tied output layer; for Falcon-H1 also two Mamba groups, no Mamba norm, other multipliers."""
    from transformers import FalconH1Config, FalconH1ForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = {
        "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2,
        "num_attention_heads": 4, "head_dim": 48, "max_position_embeddings": 512, "initializer_range": 0.15,
        "tie_word_embeddings": True,
    }  # fmt: skip
    torch.manual_seed(0)
    if family == "falcon3":
        config = LlamaConfig(
            **shape, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        )
        return LlamaForCausalLM(config).eval()
    config = FalconH1Config(
        **shape, num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        mamba_d_ssm=192, mamba_n_heads=6, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=16, mamba_rms_norm=False,
        mamba_chunk_size=16, embedding_multiplier=3.0, lm_head_multiplier=0.1, key_multiplier=0.5,
        attention_in_multiplier=1.3, attention_out_multiplier=0.8, ssm_in_multiplier=1.2, ssm_out_multiplier=0.4,
        mlp_multipliers=[0.9, 0.6], ssm_multipliers=[0.35, 0.25, 0.4, 0.5, 0.3],
    )  # fmt: skip
    return FalconH1ForCausalLM(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_wider_heads_tied_output_and_mamba_groups_generate_in_llama_cpp_as_in_transformers(
    tmp_path, tokenizer, llama, family
):
    model = random_family_model(family)
    path = tmp_path / f"{family}.gguf"
    gguf.write(model, tokenizer, path, "f32", family)
    texts, prompts = training_prompts(tokenizer, 4)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16), 1)
    got = llama({"model": str(path), "prompts": prompts, "new_tokens": 16, "score": ids})
    expected = expected_metadata(model.config)
    assert {key: got["metadata"][key] for key in expected} == expected
    difference = logit_difference(model, ids, got)
    agree = agreement(got["continuations"], [o.ids for o in ours])
    print(f"{family} layout: relative logit difference {difference:.2e}; greedy tokens equal for {agree}")
    # A wrong rotary order, head width or Mamba group layout would give unrelated logits, not a difference this small.
    assert difference <= 2e-3 and min(agree) >= 8
