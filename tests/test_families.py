"""The whole path for each family beside the 7B/40B Falcon (`lightning_falcon/architectures.py`) on a tiny model of
its shape: fit, chat, predict, evaluate, `export --merge` against the 4-bit base + adapter, and plain PEFT.

Falcon3's and Falcon-H1's tiny models ship with the package, with their family's tokenizer specials and chat
template (Falcon3's `<|user|>` turns ending in EOS, Falcon-H1's ChatML ending in its `<|im_end|>` token), so the runs
below render, train and stop as the real models do. Falcon2-11B's traits (an untied output layer, one layer norm,
grouped KV heads) are a Falcon's, built here at toy width on the tiny Falcon's tokenizer. Kill-and-resume for these
families is in tests/test_reliability.py, GGUF in tests/test_gguf.py, and their real widths in the scale tier.
"""

import io
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY,
    TINY_FAMILIES,
    adapter_changes_the_model,
    cli,
    falcon2_11b_shaped,
    fit_in_process,
    scalars,
    tuned_tiny,
)
from test_chat import one_line, run_chat
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_falcon.architectures import architecture
from lightning_falcon.assets import resolve
from lightning_falcon.data.chat_templates import resolve_template
from lightning_falcon.data.conversations import encode, rendering_of
from lightning_falcon.data.prompts import IGNORE_INDEX
from lightning_falcon.export.run import export
from lightning_falcon.model.generation import GenerationSettings, generate

FAMILIES = [*TINY_FAMILIES, "falcon2-11b"]
REQUESTS = ["What is the capital of Italy?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """family -> (the directory of its tiny model's weights, of its tokenizer)."""
    shaped = str(falcon2_11b_shaped(tmp_path_factory.mktemp("falcon2-11b")))
    return {**{family: (path, path) for family, path in TINY_FAMILIES.items()}, "falcon2-11b": (shaped, TINY)}


def model_arguments(models, family: str) -> list[str]:
    base, tokenizer = models[family]
    return ["--model.model_name_or_path", base, "--data.tokenizer", tokenizer]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models):
    """family -> configs/tiny-chat.yaml on that family's tiny model, trained 40 steps in this process: its run dir."""
    done = {}

    def get(family: str):
        if family not in done:
            root = tmp_path_factory.mktemp(family)
            steps = ["--trainer.max_steps", "40", "--trainer.val_check_interval", "20"]
            steps += ["--trainer.log_every_n_steps", "5", "--generation.max_new_tokens", "8"]
            done[family] = fit_in_process(root, *model_arguments(models, family), *steps, config="tiny-chat.yaml")
        return done[family]

    return get


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_a_reply_trains_through_the_templates_own_end_and_nothing_after(family):
    tokenizer = AutoTokenizer.from_pretrained(TINY_FAMILIES[family])
    rendering = rendering_of(tokenizer, resolve_template("auto", tokenizer))
    assert rendering.eos == ""  # Falcon3 ends a reply with EOS, Falcon-H1 with its <|im_end|> token: none is added
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    (encoded,) = encode(tokenizer, rendering, [messages], 64)
    assert encoded.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    trained = [t for t in encoded.labels if t != IGNORE_INDEX]
    end = tokenizer.eos_token if family == "falcon3" else "<|im_end|>"
    assert tokenizer.decode(trained) == f"Hello there{end}"
    assert rendering.marker == ("" if family == "falcon3" else end)  # generation stops at H1's <|im_end|> token


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fit_quantizes_every_target_trains_and_saves_the_familys_template(runs, models, family):
    run, (base, tokenizer_dir) = runs(family), models[family]
    config = AutoModelForCausalLM.from_pretrained(base).config
    targets = architecture(config).lora_targets
    loss = [v for _, v in scalars(run)["train/loss"]]
    assert loss[-1] < 0.8 * loss[0], loss
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    adapter = run / "adapter"
    assert (adapter / "chat_template.jinja").read_text() == tokenizer.chat_template
    lora = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(lora["target_modules"]) == sorted(targets)
    from safetensors.torch import load_file

    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in load_file(adapter / "adapter_model.safetensors")}
    assert adapted == set(targets)  # and none on the layers the family keeps out (H1's out_proj)
    adapter_changes_the_model(adapter, base)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_the_outputs_of_the_4bit_base_plus_adapter(runs, models, family, tmp_path):
    run, (base, tokenizer_dir) = runs(family), models[family]
    adapter = str(run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(export(adapter, str(tmp_path / "m"), merge=True, dtype="fp32"))
    original = AutoModelForCausalLM.from_pretrained(
        export(adapter, str(tmp_path / "o"), merge=True, dtype="fp32", merge_into="original")
    )
    reference = tuned_tiny(run / "adapter", base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": REQUESTS[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    with torch.no_grad():
        a, b, c = merged(ids).logits, reference(ids).logits, original(ids).logits
    error, original_error = float((a - b).norm() / b.norm()), float((c - b).norm() / b.norm())
    print(f"{family}: relative logit difference to the 4-bit base + adapter: merged into the dequantized base "
          f"{error:.2e}, into the original weights {original_error:.2e}")  # fmt: skip
    assert error <= 1e-3
    assert original_error > 100 * error  # the usual merge shifts every output by the quantization error


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_answers_as_generate_does_on_the_familys_template(runs, models, family, tmp_path, monkeypatch, capsys):
    run, (base, tokenizer_dir) = runs(family), models[family]
    out = run_chat(
        monkeypatch, capsys, io.StringIO(REQUESTS[0] + "\n"), tmp_path, *model_arguments(models, family),
        "--ckpt_path", str(run / "adapter"), "--generation.max_new_tokens", "12", "--history", "false",
        config="tiny-chat.yaml",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rendering = rendering_of(tokenizer, resolve_template("auto", tokenizer))
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": REQUESTS[0]}]
    # one request: no reply of its history, so the template's own ids are training's
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = tuned_tiny(run / "adapter", base)
    (expected,) = generate(
        model, tokenizer, [prompt], GenerationSettings(max_new_tokens=12), 1, marker=rendering.marker
    )
    print(f"{family}: {expected}")
    assert out == [one_line(expected.text)] and expected.new_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_and_evaluate_run_on_the_trained_adapter(runs, models, family):
    run = runs(family)
    root = run.parents[2]
    common = [*model_arguments(models, family), "--ckpt_path", str(run / "adapter"), "--generation.max_new_tokens", "8"]
    out = root / "predictions.jsonl"
    inputs = json.dumps(REQUESTS)
    cli(
        root,
        "predict",
        *common,
        "--generation.inputs",
        inputs,
        "--generation.output",
        str(out),
        config="tiny-chat.yaml",
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == REQUESTS and all(isinstance(r["output"], str) for r in rows)
    cli(root, "evaluate", *common, config="tiny-chat.yaml")
    report = (run / "evaluation.md").read_text()
    queries = [json.loads(line) for line in Path(resolve("asset:data/guanaco-queries.jsonl")).read_text().splitlines()]
    assert all(q["input"] in report for q in queries) and "| # | query | base | fine-tuned |" in report
    result = json.loads((run / "evaluation.json").read_text())
    assert result["fine-tuned"]["val_loss"] < result["base"]["val_loss"]


def test_generation_stops_at_falcon_h1s_end_of_turn_token_and_leaves_it_out():
    """The tiny Falcon-H1 made to answer `<|im_end|>` first: the reply ends there, empty, as at EOS; without the
    marker, generation runs past it."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_FAMILIES["falcon-h1"])
    model = AutoModelForCausalLM.from_pretrained(TINY_FAMILIES["falcon-h1"], dtype=torch.float32)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        hidden = model.model(torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = hidden / hidden.norm()  # only <|im_end|> scores above 0 at this position
    settings = GenerationSettings(max_new_tokens=4)
    rendering = rendering_of(tokenizer, resolve_template("auto", tokenizer))
    (stopped,) = generate(model, tokenizer, [prompt], settings, 1, marker=rendering.marker)
    assert (stopped.text, stopped.new_tokens, stopped.stopped_at_eos) == ("", 0, True)
    (unstopped,) = generate(model, tokenizer, [prompt], settings, 1)
    assert unstopped.ids[0] == end and not unstopped.stopped_at_eos
