"""Bad input: one line naming the problem and its fix, a non-zero exit, and no weights loaded."""

import json
import sys

import pytest
import torch
import yaml
from helpers import REPO, on_a_gpu

DATA = REPO / "tests" / "fixtures" / "data"

import lightning_falcon.export.run
import lightning_falcon.model.module
import lightning_falcon.model.quantization
from lightning_falcon.commands.main import main


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(lightning_falcon.model.module, "load_causal_lm", refuse)
    monkeypatch.setattr(lightning_falcon.export.run, "load_causal_lm", refuse)  # export's merge


def run(tmp_path, capsys, *args, subcommand="fit"):
    return fail(
        capsys,
        subcommand,
        "--config",
        "configs/tiny.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        *args,
    )


def fail(capsys, *argv):
    """Run the CLI in-process on bad input; return its one error line."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("lightning_falcon: error: ") and "Fix" in last, err
    return last


# ---------------------------------------------------------------------------------- data (tests/fixtures/data)
def data_error(tmp_path, capsys, name, *args):
    """The error of the tiny config's source reading the fixture `name`, its other settings kept."""
    return run(tmp_path, capsys, "--data.dataset.dataset", str(DATA / name), *args)


def test_missing_file(tmp_path, capsys):
    assert f"dataset file not found: {DATA / 'missing.jsonl'}" in data_error(tmp_path, capsys, "missing.jsonl")


def test_unknown_extension(tmp_path, capsys):
    err = data_error(tmp_path, capsys, "rows.xml")
    assert "rows.xml: unsupported file type. Fix: convert it to one of ['.csv', '.json', '.jsonl', '.parquet']" in err


def test_unknown_dataset(tmp_path, capsys):
    assert "unknown dataset 'nobody/nothing'" in run(tmp_path, capsys, "--data.dataset", "nobody/nothing")


def test_malformed_json_line_names_its_line(tmp_path, capsys):
    err = data_error(tmp_path, capsys, "malformed.jsonl")
    assert "malformed.jsonl line 3 is not valid JSON (Expecting ',' delimiter, column 66)" in err
    err = data_error(tmp_path, capsys, "malformed.json")
    assert "malformed.json line 3 is not valid JSON (Expecting ',' delimiter, column 33)" in err
    err = data_error(tmp_path, capsys, "malformed_object.json")  # one pretty-printed object, not JSON lines
    assert "malformed_object.json line 4 is not valid JSON (Expecting ',' delimiter, column 20)" in err


def test_a_file_that_is_not_utf8_names_the_byte_and_line(tmp_path, capsys):
    for name, line in (("latin1.jsonl", 2), ("latin1.csv", 3)):  # the CSV's line 1 is its header
        err = data_error(tmp_path, capsys, name)
        assert f"{name} is not UTF-8 text (invalid continuation byte: byte 0xe9 on line {line})" in err
        assert "Fix: save it as UTF-8" in err


def test_missing_columns_lists_those_that_exist(tmp_path, capsys):
    err = data_error(tmp_path, capsys, "other_columns.jsonl")
    assert "lacks column(s) ['prompt', 'response']; it has ['question', 'answer']" in err
    assert "Fix: name the columns that hold the text (--data.dataset.prompt_column etc.), or set " in err
    assert "--data.dataset.format to the format it has: one of messages (messages or conversations), alpaca " in err
    # format auto, the default: no format's columns are there
    err = run(tmp_path, capsys, "--data.dataset", str(DATA / "other_columns.jsonl"))
    assert "has none of the columns of a format: it has ['question', 'answer']" in err
    assert "turns (text), preference (prompt, chosen, rejected), or name yours (--data.dataset.prompt_column" in err


def test_empty_file(tmp_path, capsys):
    assert "empty.jsonl is empty" in data_error(tmp_path, capsys, "empty.jsonl")
    assert "header_only.csv is empty" in data_error(tmp_path, capsys, "header_only.csv")


def test_rows_with_empty_or_null_fields_fail_only_when_none_is_left(tmp_path, capsys):
    err = data_error(tmp_path, capsys, "all_empty.jsonl")
    assert "no row of dataset" in err and "all_empty.jsonl can train (3 an empty or null field)" in err
    assert "line 1 of all_empty.jsonl, has an empty or null field" in err  # the first row that cannot


def test_every_row_too_long(tmp_path, capsys):
    err = data_error(tmp_path, capsys, "too_long.jsonl", "--data.max_length", "40")
    assert "every one of the 3 rows of" in err  # 4 rows, one held out for validation
    assert "leaves no response token within data.max_length=40. Fix: raise --data.max_length" in err


def test_max_length_shorter_than_the_template(tmp_path, capsys):
    err = run(tmp_path, capsys, "--data.max_length", "16")  # the instruction template is 22 tiny-tokenizer tokens
    assert "data.max_length=16 is no longer than the 'instruction' chat template, which alone takes 22 tokens" in err
    assert not (tmp_path / "cache").exists()  # nothing was tokenized


def test_directory_as_dataset(tmp_path, capsys):
    assert "is a directory" in run(tmp_path, capsys, "--data.dataset", str(tmp_path))


@pytest.mark.parametrize(
    "name",
    ["missing.jsonl", "rows.xml", "empty.jsonl", "header_only.csv", "malformed.jsonl", "latin1.jsonl", "directory",
     "first_line_malformed.jsonl"],
)  # fmt: skip
def test_format_auto_reports_a_file_it_cannot_read_as_a_set_format_does(tmp_path, capsys, name):
    # `auto` reads the columns before loading: a file it cannot read gets the same line, not a guess at its columns
    path = DATA / name
    if name == "directory":
        path = tmp_path / "data"
        path.mkdir()
    elif name == "first_line_malformed.jsonl":
        path = tmp_path / name
        path.write_text('{"prompt": "a", "response": \n{"prompt": "b", "response": "c"}\n')
    set_format = run(tmp_path, capsys, "--data.dataset.dataset", str(path), "--data.dataset.format", "prompt_response")
    assert run(tmp_path, capsys, "--data.dataset.dataset", str(path), "--data.dataset.format", "auto") == set_format


# ---------------------------------------------------------------------------------- configuration
def test_target_modules_the_model_lacks(tmp_path, capsys):
    err = run(tmp_path, capsys, "--model.target_modules", "[q_proj,v_proj]")
    assert "['q_proj', 'v_proj'] not found" in err and "query_key_value" in err


def test_missing_model_path(tmp_path, capsys):
    err = run(tmp_path, capsys, "--model.model_name_or_path", str(tmp_path / "no-model"))
    assert "model '" in err and "not found" in err


def test_missing_tokenizer_path(tmp_path, capsys):
    err = run(tmp_path, capsys, "--data.tokenizer", str(tmp_path / "no-tokenizer"))
    assert "tokenizer '" in err and "not found" in err


def strategy_overlay(name):
    return ["--config", f"configs/strategy/{name}.yaml", "--trainer.devices", "2"]


def test_int8_with_zero3_fails_with_the_reason(tmp_path, capsys):
    err = run(tmp_path, capsys, *strategy_overlay("deepspeed-zero3"), "--model.quantization", "int8")
    assert "int8 + ZeRO-3 cannot work" in err and "--model.quantization nf4" in err


def test_lightnings_own_zero3_is_refused_with_the_fix(tmp_path, capsys):
    err = run(tmp_path, capsys, "--trainer.devices", "2", "--trainer.strategy", "deepspeed_stage_3")
    assert "pytorch-lightning #19731" in err and "configs/strategy/deepspeed-zero3.yaml" in err
    assert "frozen base into every checkpoint" in err  # every problem is listed, not just the first


def test_plan_refuses_what_fit_refuses_with_the_same_line(tmp_path, capsys):
    offload = [*strategy_overlay("deepspeed-zero3-offload"), "--model.optimizer", "paged_adamw_8bit"]
    fit = run(tmp_path, capsys, *offload)
    plan = run(tmp_path, capsys, *offload, subcommand="plan")
    assert fit == plan
    assert "paged_adamw_8bit cannot run with DeepSpeed optimizer offload" in fit and "--model.optimizer adamw" in fit
    # Every config problem, LoRA targets included, is listed at once, the same by both.
    both = [*strategy_overlay("deepspeed-zero3"), "--model.quantization", "int8", "--model.target_modules", "[c_attn]"]
    fit = run(tmp_path, capsys, *both)
    assert fit == run(tmp_path, capsys, *both, subcommand="plan")
    assert "model.target_modules ['c_attn'] not found" in fit and "int8 + ZeRO-3 cannot work" in fit


def test_a_deepspeed_strategy_that_keeps_the_frozen_base_is_refused():
    from lightning_falcon.training.strategy import StrategySettings, strategy_problems

    (problem,) = strategy_problems(StrategySettings.from_config("deepspeed_stage_2"), "nf4", "adamw")
    assert "exclude_frozen_parameters" in problem


@pytest.mark.parametrize(
    "compute_dtype,precision,fix",
    [
        ("bf16", "bf16-mixed", "Fix: --model.compute_dtype fp16 --trainer.precision 16-mixed (or"),
        ("auto", "bf16-true", "Fix: --trainer.precision 16-mixed"),
        ("bf16", "32-true", "Fix: --model.compute_dtype fp16 (or --model.compute_dtype auto"),
    ],
)
def test_bf16_on_a_gpu_that_only_emulates_it_is_refused_before_loading(
    tmp_path, capsys, monkeypatch, compute_dtype, precision, fix
):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    asked = on_a_gpu(monkeypatch, (7, 5), "Tesla T4")
    # fit on this CPU machine, with the trainer's device answering as this rank's GPU (not GPU 0) would
    device = torch.device("cuda", 1)
    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: device))
    err = run(tmp_path, capsys, "--model.compute_dtype", compute_dtype, "--trainer.precision", precision)
    assert "a GPU with native bf16 (compute capability 8.0 or later), and cuda:1 is Tesla T4 (7.5)" in err
    assert "which only emulates it" in err and fix in err and set(asked) == {device}


def test_bf16_on_a_gpu_that_has_it_and_fp16_on_one_that_does_not_pass(monkeypatch):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    import lightning_falcon.commands.cli
    from lightning_falcon.commands.cli import check_machine

    probed = []
    monkeypatch.setattr(lightning_falcon.commands.cli, "check_quantization_runs", lambda *args: probed.append(args))
    device = torch.device("cuda", 0)
    on_a_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    check_machine(SingleDeviceStrategy(device), "nf4", "bf16", "bf16-mixed")
    on_a_gpu(monkeypatch, (7, 0), "Tesla V100-SXM2-32GB")
    check_machine(SingleDeviceStrategy(device), "nf4", "auto", "16-mixed")
    assert probed == [("nf4", torch.bfloat16, device), ("nf4", torch.float16, device)]


def test_unknown_keys_name_the_nearest_valid_one(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  lora_rank: 8\n")
    err = run(tmp_path, capsys, "--config", str(config))
    assert err.startswith("lightning_falcon: error: unknown key model.lora_rank. Fix: did you mean model.lora_r?")
    err = run(tmp_path, capsys, "--model.colour", "blue")
    assert "unknown key model.colour. Fix: remove it. `python -m lightning_falcon fit --help` lists every key" in err


def test_wrong_types_name_the_key_and_what_it_takes(tmp_path, capsys):
    err = run(tmp_path, capsys, "--data.batch_size", "four")
    assert (
        "bad value for data.batch_size: Expected a <class 'int'>. Got value: four. Fix: correct data.batch_size" in err
    )
    err = run(tmp_path, capsys, "--data.dataset.format", "chat")
    formats = "['auto', 'messages', 'alpaca', 'prompt_response', 'turns', 'preference']"
    assert f"data.dataset.format must be one of {formats}, got 'chat'. Fix: --data.dataset.format auto" in err
    err = run(tmp_path, capsys, "--data.dataset.format", "preferences")
    assert "got 'preferences'. Fix: --data.dataset.format preference" in err


def test_lora_rank_below_one(tmp_path, capsys):
    assert "model.lora_r must be >= 1, got 0" in run(tmp_path, capsys, "--model.lora_r", "0")


def test_a_quantization_this_machine_cannot_run(tmp_path, capsys, monkeypatch):
    from lightning_falcon.model.quantization import check_quantization_runs

    # bitsandbytes 0.50 runs every mode on CPU, so none is refused there, and
    # the check leaves the seeded random state as it found it ...
    rng = torch.get_rng_state()
    for mode in ("nf4", "fp4", "int8"):
        check_quantization_runs(mode, torch.float32, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    # ... and where bitsandbytes cannot run at all (here: it does not import), every mode but none is refused.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    err = run(tmp_path, capsys, "--model.quantization", "int8")
    assert "model.quantization int8 needs bitsandbytes, which does not import here" in err
    assert "--model.quantization none" in err
    monkeypatch.undo()


def test_a_quantized_layer_that_fails_on_this_device_is_one_line(tmp_path, capsys, monkeypatch):
    import lightning_falcon.model.quantization

    def no_kernel(*args):  # as bitsandbytes fails on a device it has no kernel for
        raise NotImplementedError("no gemv_4bit kernel for this device\n(details)")

    monkeypatch.setattr(lightning_falcon.model.quantization, "_run_quantized_layer", no_kernel)
    err = run(tmp_path, capsys, "--model.quantization", "fp4")
    assert "model.quantization fp4 (float32 compute) does not run on cpu with bitsandbytes 0." in err
    assert ": no gemv_4bit kernel for this device. Fix: choose another --model.quantization" in err


def test_a_strategy_the_accelerator_cannot_run(tmp_path, capsys):
    err = run(tmp_path, capsys, "--config", "configs/strategy/deepspeed-zero2.yaml")
    assert "DeepSpeed runs on CUDA GPUs only, and this run's accelerator is CPUAccelerator" in err
    err = run(tmp_path, capsys, "--trainer.strategy", "fsdp", "--trainer.devices", "2")
    assert "the trainer settings do not fit this machine: The strategy `fsdp` requires a GPU accelerator" in err
    if not torch.cuda.is_available():
        err = run(tmp_path, capsys, "--trainer.accelerator", "gpu")
        assert "the trainer settings do not fit this machine" in err
    err = run(tmp_path, capsys, "--trainer.gradient_clip_algorithm", "sideways")  # not a machine problem
    assert "bad trainer setting: `gradient_clip_algorithm` sideways is invalid" in err


# ---------------------------------------------------------------------------------- predict, evaluate, export
def lora_checkpoint(path, lora_r=16):
    """A checkpoint as fit writes it, as far as the LoRA check reads: the hyperparameters."""
    hparams = {"model_name_or_path": "asset:tiny-falcon", "lora_r": lora_r, "lora_alpha": 32, "target_modules": None}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    return str(path)


@pytest.mark.parametrize("subcommand", ["predict", "chat"])
def test_checkpoint_with_other_lora_shapes(tmp_path, capsys, subcommand):
    ckpt = lora_checkpoint(tmp_path / "r16.ckpt")
    err = run(tmp_path, capsys, "--ckpt_path", ckpt, "--model.lora_r", "8", subcommand=subcommand)
    assert "does not match the model config: it was trained with lora_r=16 (config: 8)" in err
    assert "Fix: pass --model.lora_r 16" in err


class RunsCode:
    """What a malicious checkpoint pickles: unpickling it calls open(path, "w"), creating the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_a_checkpoint_carrying_code_is_refused_unrun(tmp_path, capsys, subcommand):
    evil = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"lora_r": 16}, "state_dict": {}, "x": RunsCode(tmp_path / "ran")}, evil)
    err = run(tmp_path, capsys, "--ckpt_path", str(evil), subcommand=subcommand)
    assert f"checkpoint {evil} holds Python objects besides tensors, so it does not load with weights_only=True" in err
    assert "it would call io.open" in err and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("subcommand", ["evaluate", "chat"])
def test_one_device_commands_need_a_run_to_read(tmp_path, capsys, subcommand):
    err = run(tmp_path, capsys, "--ckpt_path", "last", subcommand=subcommand)
    assert f"{subcommand} found no checkpoint for --ckpt_path last. Fix: train first, or name a checkpoint" in err
    shards = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    (shards / "checkpoint").mkdir(parents=True)
    (shards / "latest").write_text("checkpoint")
    err = run(tmp_path, capsys, "--ckpt_path", str(shards), subcommand=subcommand)
    assert f"is a DeepSpeed checkpoint (one shard per rank), and {subcommand} runs on one device" in err
    assert f"Fix: give the run's adapter: --ckpt_path {shards.parent.parent / 'adapter'}" in err


def test_adapter_directory_without_adapter_config(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    err = run(tmp_path, capsys, "--ckpt_path", str(tmp_path / "adapter"), subcommand="predict")
    assert "has no adapter_config.json, so it is not a PEFT adapter" in err
    err = fail(capsys, "export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"))
    assert "has no adapter_config.json" in err and not (tmp_path / "out").exists()


def test_empty_input_file(tmp_path, capsys):
    ckpt = lora_checkpoint(tmp_path / "r16.ckpt")
    (tmp_path / "inputs.txt").write_text("\n  \n")
    args = ["--ckpt_path", ckpt, "--generation.input_file", str(tmp_path / "inputs.txt")]
    assert f"input file {tmp_path / 'inputs.txt'} is empty" in run(tmp_path, capsys, *args, subcommand="predict")


def test_push_to_hub_without_a_token(tmp_path, capsys, monkeypatch, fake_adapter):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    err = fail(capsys, "export", "--adapter", fake_adapter, "--output", str(tmp_path / "out"), "--push_to_hub", "me/x")
    assert "--push_to_hub needs a Hub token in the environment. Fix: export HF_TOKEN=" in err
    assert not (tmp_path / "out").exists()


def test_export_never_replaces_what_is_not_an_earlier_export(tmp_path, capsys, fake_adapter):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    common = ["export", "--adapter", fake_adapter, "--merge", "--merge_into", "original"]
    err = fail(capsys, *common, "--output", str(tmp_path / "out"))
    assert "exists and is not empty" in err
    err = fail(capsys, *common, "--output", str(tmp_path / "out"), "--overwrite")
    assert "is not an earlier export, so --overwrite will not replace it" in err
    # the run directory that holds the adapter (and its checkpoints) is never an output
    err = fail(capsys, *common, "--output", str(tmp_path), "--overwrite")
    assert "overlaps the adapter directory" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me" and (tmp_path / "adapter").is_dir()


def test_merging_an_adapter_trained_with_remote_code_needs_your_consent(tmp_path, capsys, fake_adapter):
    metadata = {"base": "someone/custom-falcon", "quantization": "nf4", "trust_remote_code": True}
    (tmp_path / "adapter" / "lightning_falcon.json").write_text(json.dumps(metadata))
    err = fail(capsys, "export", "--adapter", fake_adapter, "--output", str(tmp_path / "out"), "--merge")
    assert "was trained with trust_remote_code, so merging runs Python code from its base's repository" in err
    assert "Fix: add --trust_remote_code true" in err and not (tmp_path / "out").exists()


def test_merging_an_adapter_without_training_metadata_asks_how(tmp_path, capsys, fake_adapter):
    err = fail(capsys, "export", "--adapter", fake_adapter, "--output", str(tmp_path / "out"), "--merge")
    assert "has no lightning_falcon.json" in err and "Fix: --merge_into original" in err


def test_an_adapter_trained_on_another_base(tmp_path, capsys, fake_adapter):
    from safetensors.torch import save_file

    # falcon-7b's query_key_value takes 4544 inputs; the tiny model's takes 128
    key = "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight"
    save_file({key: torch.zeros(16, 4544)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    err = run(tmp_path, capsys, "--ckpt_path", fake_adapter, subcommand="predict")
    assert "has transformer.h.0.self_attention.query_key_value.lora_A of shape (16, 4544)" in err
    assert "does not fit the model's transformer.h.0.self_attention.query_key_value (128 -> 192)" in err


@pytest.fixture
def fake_adapter(tmp_path):
    """An adapter directory as far as the checks read: adapter_config.json (r 16, alpha 32, Falcon's targets)."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    return str(tmp_path / "adapter")


def test_gguf_options_that_do_not_fit_are_listed_before_loading(tmp_path, capsys, fake_adapter):
    err = fail(capsys, "export", "--adapter", fake_adapter, "--output", str(tmp_path / "out"), "--gguf_type", "q8_0")
    assert "--gguf_type applies only with --format gguf. Fix: add --format gguf" in err
    out = ["--output", str(tmp_path / "out"), "--format", "gguf"]
    err = fail(capsys, "export", "--adapter", fake_adapter, *out, "--dtype", "bf16")
    assert "a GGUF's weights take --gguf_type. Fix: drop --dtype" in err


def test_a_gguf_of_a_model_llama_cpp_cannot_run_fails_before_loading(tmp_path, capsys, fake_adapter):
    base = tmp_path / "alibi-falcon"
    base.mkdir()
    config = json.loads((REPO / "lightning_falcon/assets/tiny-falcon/config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "alibi": True}))
    meta = {"base": str(base), "quantization": "nf4", "prompt": None}
    (tmp_path / "adapter" / "lightning_falcon.json").write_text(json.dumps(meta))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "adapter" / name).write_bytes((REPO / "lightning_falcon/assets/tiny-falcon" / name).read_bytes())
    with pytest.raises(SystemExit):
        main(["export", "--adapter", fake_adapter, "--output", str(tmp_path / "out"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert "the model uses ALiBi, which llama.cpp's Falcon does not" in err
    assert "does not say how training rendered prompts" in err  # every problem, in one go
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- a mix: the source is named
def mix_error(tmp_path, capsys, broken: dict, *args, first: dict | None = None):
    """The error of a mix of the Midjourney data and a source named `broken`, from an overlay on the tiny config."""
    sources = [first or {"name": "midjourney", "dataset": "asset:data/midjourney.jsonl"}, {"name": "broken", **broken}]
    overlay = tmp_path / "mix.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"dataset": sources}}, width=1000))
    return run(tmp_path, capsys, "--config", str(overlay), *args)


@pytest.mark.parametrize(
    "broken, args, expected",
    [
        ({"dataset": str(DATA / "missing.jsonl")}, [], "dataset file not found: 'broken' ("),
        ({"dataset": str(DATA / "rows.xml")}, [], "dataset 'broken' ("),
        ({"dataset": "nobody/nothing"}, [], "unknown dataset 'broken' (nobody/nothing)"),
        ({"dataset": str(DATA / "malformed.jsonl")}, [], "dataset 'broken': "),
        ({"dataset": str(DATA / "latin1.jsonl")}, [], "dataset 'broken': "),
        ({"dataset": str(DATA / "other_columns.jsonl")}, [], "or name yours (data.dataset[1].prompt_column etc.)"),
        ({"dataset": str(DATA / "empty.jsonl")}, [], "jsonl) is empty. Fix: point data.dataset[1].dataset at"),
        ({"dataset": str(DATA / "all_empty.jsonl")}, [], "no row of dataset 'broken' ("),
        ({"dataset": str(DATA / "too_long.jsonl")}, ["--data.max_length", "40"], "rows of dataset 'broken' ("),
        ({"dataset": str(DATA / "some_empty.jsonl"), "val_dataset": str(DATA / "empty.jsonl")}, [],
         "'broken' (" + str(DATA / "empty.jsonl") + ") is empty. Fix: point data.dataset[1].val_dataset"),
        ({"dataset": str(DATA / "some_empty.jsonl"), "val_fraction": 0.9}, [], "'broken' ("),
        ({"dataset": str(DATA / "missing.jsonl"), "template": "nope"}, [],
         "data.dataset[1].template: the template is data.chat_template now"),
        ({"dataset": str(DATA / "missing.jsonl"), "weight": 0}, [], "data.dataset[1].weight must be above 0"),
        ({"dataset": str(DATA / "missing.jsonl"), "val_fraction": 1.5}, [], "data.dataset[1].val_fraction"),
        ({"dataset": str(DATA / "missing.jsonl"), "name": "a b"}, [], "data.dataset[1].name 'a b'"),
        ({"dataset": str(DATA / "missing.jsonl"), "name": "midjourney"}, [], "data.dataset[0], data.dataset[1]"),
        (
            {"dataset": "x.jsonl", "wieght": 3},
            [],
            "unknown key data.dataset[1].wieght. Fix: did you mean data.dataset[1].weight?",
        ),
        ({"dataset": "x.jsonl", "weight": "x"}, [], "data.dataset[1].weight must be a number, got 'x'"),
        ({"dataset": "x.jsonl", "weight": float("nan")}, [], "data.dataset[1].weight must be above 0, got nan"),
        (
            {"dataset": "x.jsonl", "format": "chat"},
            [],
            ("data.dataset[1].format must be one of ['auto', 'messages', 'alpaca', 'prompt_response', 'turns', "
            "'preference']"),
        ),
        ({"format": "turns"}, [], "data.dataset[1] has no dataset. Fix: data.dataset[1]: {dataset: "),
        (
            {"dataset": "x.jsonl"},
            ["--data.human_marker", "User:"],
            "data.human_marker is a setting of a source now. Fix: data.dataset: {dataset: ",
        ),
    ],
    ids=[
        "missing", "extension", "hub", "json", "utf8", "columns", "empty", "blank", "too-long", "empty-val",
        "too-few-to-train",
        "template", "weight", "val-fraction", "name", "same-name", "key", "weight-type",
        "weight-nan", "format", "no-dataset", "setting-beside",
    ],
)  # fmt: skip
def test_every_bad_source_of_a_mix_is_named(tmp_path, capsys, broken, args, expected):
    err = mix_error(tmp_path, capsys, broken, *args)
    assert expected in err and "Fix" in err, err


def test_a_mix_lists_every_bad_source_at_once(tmp_path, capsys):
    first = {"name": "midjourney", "dataset": "asset:data/midjourney.jsonl", "weight": -1}
    err = mix_error(tmp_path, capsys, {"dataset": "x.jsonl", "template": "nope"}, first=first)
    assert "data.dataset[0].weight" in err and "data.dataset[1].template" in err


def test_max_length_shorter_than_a_sources_template_names_it(tmp_path, capsys):
    broken = {"dataset": "asset:data/guanaco-sample.jsonl", "format": "turns", "human_marker": "### " + "Human " * 60}
    err = mix_error(tmp_path, capsys, broken, "--data.max_length", "40")
    assert "no longer than the turn markers (source 'broken')" in err and "midjourney" not in err
    assert not (tmp_path / "cache").exists()  # nothing was tokenized


def test_a_config_written_before_sources_is_told_where_each_data_key_went(tmp_path, capsys):
    overlay = tmp_path / "mix.yaml"
    overlay.write_text(json.dumps({"data": {"datasets": [{"dataset": "asset:data/midjourney.jsonl"}]}}))
    err = run(tmp_path, capsys, "--config", str(overlay))
    assert err.endswith("data.datasets is data.dataset now, which takes one source or a list of them. "
                        "Fix: rename data.datasets to data.dataset")  # fmt: skip
    overlay.write_text(json.dumps({"data": {"dataset": "asset:data/midjourney.jsonl", "template": "guanaco"}}))
    err = run(tmp_path, capsys, "--config", str(overlay))
    assert "data.template: the template is data.chat_template now: one chat template renders every source. " in err
    assert "Fix: --data.chat_template NAME (e.g. instruction, falcon-instruct)" in err
    source = {"dataset": "asset:data/midjourney.jsonl", "template": "plain"}  # a source's own
    overlay.write_text(json.dumps({"data": {"dataset": source}}))
    err = run(tmp_path, capsys, "--config", str(overlay))
    assert "data.dataset.template: the template is data.chat_template now" in err
    err = run(tmp_path, capsys, "--data.format", "turns")
    assert "data.format is a setting of a source now. Fix: data.dataset: {dataset: " in err


# ---------------------------------------------------------------------------------- preference tuning
def test_preference_objective_on_sft_rows_and_packed_pairs(tmp_path, capsys):
    err = run(tmp_path, capsys, "--model.objective", "dpo")
    assert "model.objective dpo trains on preference pairs, but data source(s) ['midjourney'] hold" in err
    err = run(
        tmp_path, capsys, "--config", "configs/tiny-dpo.yaml", "--model.adapter", "null", "--data.batching", "packed"
    )
    assert "data.batching packed: a preference pair's two sequences are scored whole" in err
    assert "Fix: --data.batching grouped" in err
    # plan refuses what fit refuses, with the same line
    assert fail(capsys, "plan", "--config", "configs/tiny-dpo.yaml", "--data.batching", "packed") == err


def test_preference_rows_under_sft_and_bad_settings(tmp_path, capsys):
    err = run(
        tmp_path, capsys, "--config", "configs/tiny-dpo.yaml", "--model.adapter", "null", "--model.objective", "sft"
    )
    assert "hold preference pairs (chosen and rejected answers), which model.objective sft does not train on" in err
    err = run(tmp_path, capsys, "--model.objective", "orpo", "--model.beta", "0", "--model.label_smoothing", "0.1")
    assert "model.beta must be > 0, got 0.0" in err and "applies to objective dpo only, not orpo" in err
    err = run(tmp_path, capsys, "--model.objective", "orpo", "--model.precompute_reference", "true")
    assert "model.precompute_reference: objective orpo has no reference model" in err


def test_preference_file_without_rejected_answers(tmp_path, capsys):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    err = run(
        tmp_path,
        capsys,
        "--config",
        "configs/tiny-dpo.yaml",
        "--model.adapter",
        "null",
        "--data.dataset.dataset",
        str(rows),
        "--data.dataset.val_dataset",
        "null",
    )
    assert "lacks column(s) ['rejected']; it has ['prompt', 'chosen']" in err


def test_missing_adapter_to_start_from(tmp_path, capsys):
    err = run(tmp_path, capsys, "--model.adapter", str(tmp_path / "runs" / "tiny" / "version_0" / "adapter"))
    assert "version_0/adapter not found. Fix: train it first (fit writes runs/NAME/version_N/adapter)" in err
