"""export: the adapter as PEFT loads it, and the merge that keeps what the 4-bit base + adapter computed."""

import sys

import pytest
import torch
from helpers import TINY, tuned_tiny
from processes import run_process

from lightning_falcon.export.run import export

pytestmark = pytest.mark.slow
TEXTS = [
    "### Instruction:\nMidjourney prompt for a boy running in the snow\n\n### Response:\n a boy in the snow",
    "### Instruction:\nmj prompt: a lighthouse in a storm\n\n### Response:\n",
]


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits[0] for t in TEXTS])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def exported(fitted, tmp_path_factory):
    _, run, _ = fitted
    out = tmp_path_factory.mktemp("export")
    adapter = str(run / "adapter")
    return {
        "adapter": export(adapter, str(out / "adapter")),
        "merged": export(adapter, str(out / "merged"), merge=True, dtype="fp32"),
        "original": export(adapter, str(out / "original"), merge=True, dtype="fp32", merge_into="original"),
        "bf16": export(adapter, str(out / "bf16"), merge=True),
    }


def test_merge_keeps_the_outputs_of_the_4bit_base_plus_adapter(fitted, exported, tokenizer):
    from transformers import AutoModelForCausalLM

    _, run, _ = fitted
    reference = logits(tuned_tiny(run / "adapter"), tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(exported["merged"])
    original = AutoModelForCausalLM.from_pretrained(exported["original"])
    dequantized_error = relative(logits(merged, tokenizer), reference)
    original_error = relative(logits(original, tokenizer), reference)
    print(
        f"relative logit difference to the 4-bit base + adapter: merged into the dequantized base "
        f"{dequantized_error:.2e}, into the original weights {original_error:.2e}"
    )
    assert dequantized_error <= 1e-3
    # The usual merge into the unquantized weights shifts every output by the quantization error.
    assert original_error > 100 * dequantized_error


def test_merged_model_keeps_the_base_dtype_and_drops_quantization(exported):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(exported["bf16"])
    assert getattr(config, "quantization_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(exported["bf16"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the tiny base is stored in bf16
    assert not any("lora" in name for name, _ in model.named_parameters())


FRESH_PROCESS = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
merged_dir, adapter_dir, base = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(merged_dir)
request = [{"role": "user", "content": "Midjourney prompt for a boy running in the snow"}]
text = tok.apply_chat_template(request, tokenize=False, add_generation_prompt=True)  # the run's template
ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
merged = AutoModelForCausalLM.from_pretrained(merged_dir)
new = merged.generate(ids, max_new_tokens=100)[0, ids.shape[1]:]  # EOS and pad from the saved generation config
plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
with torch.no_grad():
    before = plain(ids).logits
    tuned = PeftModel.from_pretrained(plain, adapter_dir)(ids).logits
print(json.dumps({"stopped": int(new[-1]) == tok.eos_token_id, "tokens": len(new), "prompt": text,
                  "text": tok.decode(new, skip_special_tokens=True),
                  "adapter_changes_logits": bool((before - tuned).abs().max() > 1e-3)}))
"""


def test_exported_directories_load_with_plain_transformers_and_peft_in_a_fresh_process(exported):
    import json

    proc = run_process(
        [sys.executable, "-c", FRESH_PROCESS, str(exported["merged"]), str(exported["adapter"]), TINY], timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stopped"] and result["tokens"] < 100 and "--ar" in result["text"], result
    assert result["adapter_changes_logits"]
    # the merged model's tokenizer renders a request as training did: the tiny config's `instruction` template
    assert result["prompt"] == "### Instruction:\nMidjourney prompt for a boy running in the snow\n\n### Response:\n"
    assert {p.name for p in exported["adapter"].iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "lightning_falcon.json",
    }


def test_a_push_that_fails_names_no_token_and_writes_none(fitted, tmp_path):
    token = "hf_PLANTEDtokenNEVERtoBEwritten1234"
    _, run, _ = fitted
    env = {
        "HF_TOKEN": token,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: the upload fails at once
        "PATH": "/usr/bin:/bin",
    }
    out = tmp_path / "out"
    proc = run_process(
        [
            sys.executable,
            "-m",
            "lightning_falcon",
            "export",
            "--adapter",
            str(run / "adapter"),
            "--output",
            str(out),
            "--push_to_hub",
            "me/tiny-midjourney",
        ],
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "push to the Hub repo 'me/tiny-midjourney' failed" in proc.stderr, proc.stderr
    assert token not in proc.stdout + proc.stderr
    assert (out / "adapter_config.json").is_file()  # the export itself is written before the push
    # nothing anywhere it could have written holds the token: the export, the working directory, the run
    written = [p for root in (tmp_path, run) for p in root.rglob("*") if p.is_file()]
    assert not [p for p in written if token.encode() in p.read_bytes()]


def test_overwrite_replaces_an_earlier_export_readable_by_others(fitted, tmp_path):
    import os
    import stat

    _, run, _ = fitted
    out = tmp_path / "export"
    export(str(run / "adapter"), str(out))
    (out / "stale.txt").write_text("from the earlier export")
    export(str(run / "adapter"), str(out), overwrite=True)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging or old copy left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
