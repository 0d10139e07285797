"""Using the trained tiny model: predict, samples during fit, the evaluation report, and stopping at EOS."""

import json
from pathlib import Path

import pytest
from helpers import MIDJOURNEY, REPO, chat_format, cli, cli_error, sample_texts, scalars, tuned_tiny, write_jsonl

from lightning_falcon.errors import ConfigError
from lightning_falcon.model.generation import GenerationSettings, generate

TINY_CONFIG = str(REPO / "configs/tiny.yaml")
REQUESTS = [
    "Midjourney prompt for a boy running in the snow",
    "mj prompt: a lighthouse in a storm, vertical",
    "Give me a Midjourney prompt of an old fisherman, version 6",
]


@pytest.mark.slow
def test_greedy_generation_is_deterministic_and_independent_of_the_batch(fitted, tokenizer):
    _, run, _ = fitted
    model = tuned_tiny(run / "adapter")
    prompts = [chat_format(tokenizer).prompt_ids(tokenizer, text) for text in REQUESTS]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is really left-padded
    settings = GenerationSettings(max_new_tokens=48)
    batched = generate(model, tokenizer, prompts, settings, batch_size=len(prompts))
    again = generate(model, tokenizer, prompts, settings, batch_size=len(prompts))
    alone = [generate(model, tokenizer, [p], settings, batch_size=1)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in again] == [g.text for g in alone]
    assert all(g.text for g in batched)


def test_generation_settings_list_every_problem():
    with pytest.raises(ConfigError) as e:
        GenerationSettings(max_new_tokens=0, temperature=0, top_p=1.5, inputs=["a"], input_file="x.txt")
    message = str(e.value)
    for key in ("max_new_tokens", "temperature", "top_p", "inputs and generation.input_file"):
        assert key in message, message


@pytest.mark.slow
def test_predict_for_inputs_from_the_command_line_a_text_file_and_an_adapter(fitted, tmp_path):
    root, run, _ = fitted
    ckpt = str(run / "checkpoints" / "last.ckpt")
    cli(root, "predict", "--ckpt_path", ckpt, "--generation.inputs", json.dumps(REQUESTS[:2]))
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == REQUESTS[:2] and all(r["output"] and r["eos"] for r in rows)

    lines = tmp_path / "requests.txt"
    lines.write_text("\n".join(REQUESTS) + "\n\n")
    out = tmp_path / "from-adapter.jsonl"
    proc = cli(
        root,
        "predict",
        "--ckpt_path",
        str(run / "adapter"),
        "--generation.input_file",
        str(lines),
        "--generation.output",
        str(out),
    )
    assert f"LoRA weights loaded from {run / 'adapter'}" in proc.stderr
    from_adapter = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in from_adapter] == REQUESTS
    # the adapter and the checkpoint of the same step are the same model: same greedy outputs
    assert [r["output"] for r in from_adapter[:2]] == [r["output"] for r in rows]


@pytest.mark.slow
def test_predict_runs_in_one_process_whatever_the_config_distributes_over(fitted, tmp_path):
    root, run, _ = fitted
    out = tmp_path / "ddp.jsonl"
    ddp = ["--config", str(REPO / "configs/strategy/ddp.yaml"), "--trainer.devices", "2"]
    inputs = REQUESTS * 3  # more inputs than one batch: every batch lands in the one file, in order
    cli(
        root,
        "predict",
        *ddp,
        "--ckpt_path",
        str(run / "adapter"),
        "--generation.inputs",
        json.dumps(inputs),
        "--generation.output",
        str(out),
        "--data.batch_size",
        "4",
    )
    assert [json.loads(line)["input"] for line in out.read_text().splitlines()] == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.jsonl"]  # no per-rank files


@pytest.mark.slow
def test_the_trained_model_stops_at_eos_on_training_inputs(fitted, tmp_path):
    root, run, _ = fitted
    rows = [json.loads(line) for line in Path(MIDJOURNEY).read_text().splitlines()][:24]
    inputs = write_jsonl(tmp_path / "train-inputs.jsonl", [{"prompt": r["prompt"]} for r in rows])
    out = tmp_path / "stop.jsonl"
    cli(
        root,
        "predict",
        "--ckpt_path",
        str(run / "adapter"),
        "--generation.input_file",
        inputs,
        "--generation.max_new_tokens",
        "128",
        "--generation.output",
        str(out),
    )
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    stopped = sum(r["eos"] for r in outputs)
    print(f"ended at EOS before 128 tokens: {stopped}/{len(outputs)}")
    assert stopped >= 0.8 * len(outputs)


@pytest.mark.slow
def test_samples_are_logged_to_tensorboard_at_every_validation(fitted):
    _, run, _ = fitted
    texts = sample_texts(run)
    assert sorted(texts) == [0, 100, 200, 300, 400, 500]  # the sanity check (the untrained "before"), then each
    for text in texts.values():
        assert "Midjourney prompt for a fantasy village at night" in text and "mj prompt: a lighthouse" in text
    assert texts[0].count("| cut |") == 3 and texts[500].count("| EOS |") >= 2  # it learned to stop
    assert scalars(run)["samples/eos_rate"][-1][1] >= 2 / 3


@pytest.mark.slow
def test_evaluate_writes_a_side_by_side_report_with_every_query(fitted):
    root, run, _ = fitted
    before = sorted((root / "runs" / "tiny").iterdir())
    proc = cli(root, "evaluate", "--ckpt_path", str(run / "checkpoints" / "step=500.ckpt"))
    assert sorted((root / "runs" / "tiny").iterdir()) == before  # the report goes into the run evaluated
    assert not (root / "config.yaml").exists()
    report = (run / "evaluation.md").read_text()
    queries = [json.loads(line) for line in (REPO / "lightning_falcon/assets/data/midjourney-queries.jsonl").open()]
    assert len(queries) == 12
    for q in queries:
        assert q["input"] in report
    assert report.index("## easy") < report.index("## intermediate") < report.index("## advanced")
    assert "| # | query | base | fine-tuned |" in report and "| outputs ended at EOS |" in report
    result = json.loads((run / "evaluation.json").read_text())
    base, tuned = result["base"], result["fine-tuned"]
    print(proc.stderr[proc.stderr.find("[evaluate]") :])
    assert tuned["val_loss"] < base["val_loss"] - 3  # the random base knows nothing of Midjourney prompts
    assert tuned["eos"] > base["eos"] and tuned["mean_tokens"] < base["mean_tokens"]


@pytest.mark.slow
def test_a_checkpoint_with_other_lora_shapes_fails_before_loading(fitted):
    root, run, _ = fitted
    ckpt = str(run / "checkpoints" / "step=500.ckpt")
    common = ["--config", TINY_CONFIG, "--data.cache_dir", str(root / "cache"), "--ckpt_path", ckpt]
    err = cli_error(root, "predict", *common, "--model.lora_r", "8")
    assert "it was trained with lora_r=16 (config: 8)" in err and "--model.lora_r 16" in err
    err = cli_error(root, "evaluate", *common, "--model.target_modules", '["dense"]')
    assert "target_modules=['dense', 'dense_4h_to_h', 'dense_h_to_4h', 'query_key_value']" in err


@pytest.mark.slow
def test_beam_search_and_seeded_sampling_stop_at_eos_and_repeat(fitted, tokenizer):
    import torch

    _, run, _ = fitted
    model = tuned_tiny(run / "adapter")
    prompts = [chat_format(tokenizer).prompt_ids(tokenizer, text) for text in REQUESTS]
    beams = generate(model, tokenizer, prompts, GenerationSettings(num_beams=3), batch_size=3)
    sampling = GenerationSettings(do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(7)
    first = generate(model, tokenizer, prompts, sampling, batch_size=3)
    torch.manual_seed(7)
    again = generate(model, tokenizer, prompts, sampling, batch_size=3)
    assert [g.text for g in first] == [g.text for g in again]  # a seeded sample repeats
    for outputs in (beams, first):
        assert all(g.text and g.stopped_at_eos and g.new_tokens < 128 for g in outputs), outputs


@pytest.mark.slow
def test_sampled_samples_during_fit_leave_training_unchanged(tmp_path):
    import torch

    # Sampling draws from the global generators; the callback forks them, so these two runs train alike.
    short = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--checkpoint.every_n_train_steps", "6"]
    short += ["--model.lora_dropout", "0.1"]  # dropout draws from the generator training shares with sampling
    adapters = {}
    for name, samples in (("without", "[]"), ("with", '["mj prompt: a cat", "a fox"]')):
        root = tmp_path / name
        root.mkdir()
        cli(root, "fit", *short, "--generation.samples", samples, "--generation.do_sample", "true")
        adapters[name] = torch.load(
            root / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )["state_dict"]
    assert sample_texts(tmp_path / "with" / "runs" / "tiny" / "version_0")  # the samples really were generated
    for key, value in adapters["without"].items():
        assert torch.equal(value, adapters["with"][key]), key
