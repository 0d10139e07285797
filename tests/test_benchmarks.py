"""The benchmark harness runs, and its overhead comparison really is identical work on both sides."""

import sys

import pytest
from helpers import REPO


@pytest.mark.slow
def test_overhead_benchmark_trains_both_sides_on_the_same_tokens():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import overhead

    out = overhead.compare(steps=8, warmup=2, repeats=2)
    fits, loops = out["runs"]["fit"], out["runs"]["loop"]
    # The same batches in the same order, on both sides and in every repeat: the step-by-step floor compares
    # like with like.
    assert all(r["step_tokens"] == fits[0]["step_tokens"] for r in fits + loops) and fits[0]["tokens"] > 0
    assert all(r["timed_steps"] == len(r["step_seconds"]) == 6 for r in fits + loops)
    # And the same training: fit's loss at every step is the hand-written loop's, to the bit.
    assert all(r["losses"] == loops[0]["losses"] for r in fits + loops) and len(loops[0]["losses"]) == 6
    floor = sum(fits[0]["step_tokens"]) / sum(
        min(a, b) for a, b in zip(*(r["step_seconds"] for r in fits), strict=False)
    )
    assert out["fit"]["floor"] == pytest.approx(floor) and out["fit"]["floor"] >= out["fit"]["median"]
    assert out["ratio"]["floor"] == pytest.approx(out["fit"]["floor"] / out["loop"]["floor"])


@pytest.mark.slow
def test_interleaved_overhead_run_trains_both_sides_alike_in_one_process():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import overhead

    out = overhead.interleaved(steps=8, warmup=2, repeats=1)
    (run,) = out["runs"]
    fit, loop = run["fit"], run["loop"]
    # A fit step, then a loop step, on the same batch and from the same weights: equal losses at every step.
    assert len(fit["step_seconds"]) == len(loop["step_seconds"]) == 6 and fit["step_tokens"] == loop["step_tokens"]
    assert fit["losses"] == loop["losses"] and all(t > 0 for t in fit["step_seconds"] + loop["step_seconds"])
    assert out["ratio"] == pytest.approx(loop["seconds"] / fit["seconds"])
    # One run: its fixed cost is the mean over the steps of fit's step time less the loop's.
    differences = [1e3 * (a - b) for a, b in zip(fit["step_seconds"], loop["step_seconds"], strict=False)]
    assert out["fixed_cost_ms"] == pytest.approx(sum(differences) / len(differences))
    # Each timed step splits into the same phases on both sides, and they add up to the step's time.
    for side in (fit, loop):
        assert len(side["phases"]) == 6 and all(set(p) == set(overhead.PHASES) for p in side["phases"])
        for phases, seconds in zip(side["phases"], side["step_seconds"], strict=False):
            assert all(t > 0 for t in phases.values()) and sum(phases.values()) == pytest.approx(seconds)
    assert "| whole step |" in overhead.phase_table(out["runs"])


@pytest.mark.slow
def test_gpu_benchmark_dry_run_takes_every_path_but_cuda_and_writes_each_section(tmp_path):
    """`benchmarks/gpu.py --dry-run`: the GPU visit's benchmark on CPU, tiny shapes, both sections, all in JSON."""
    import json
    import subprocess

    out = tmp_path / "gpu.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--json", str(out)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] and "no GPU" in results["device"]
    try:
        import trl

        has_trl = True
    except ImportError:  # CI installs no `[bench]` extra: the script must say it skipped TRL, and go on
        has_trl = False
    sides = ["fit", "trl"] if has_trl else ["fit"]
    rows = results["7b"]["rows"]
    assert [(row[0], row[1]) for row in rows] == [(length, side) for length in (64, 128) for side in sides]
    for key, run in results["7b"]["runs"].items():
        length = int(key.split("/")[0])
        assert run["tokens_per_sec"] > 0 and run["timed_steps"] > 0, key
        # every row cut to exactly `length` tokens, 256 tokens a micro-batch: no padding on either side
        assert set(run["step_tokens"]) == {256}, (key, run["step_tokens"])
    if has_trl:  # like for like: the same micro-batches, so the same tokens, on both sides
        for length in (64, 128):
            fit, trl = results["7b"]["runs"][f"{length}/fit"], results["7b"]["runs"][f"{length}/trl"]
            assert fit["step_tokens"] == trl["step_tokens"]
    else:
        assert results["7b"]["skipped"].startswith("TRL side skipped") and "TRL side skipped" in proc.stdout
    forty = dict(results["40b"]["rows"])
    assert set(results["40b"]["runs"]) == {"1", "2"}
    assert any(key.startswith("plan's estimate for 60 layers") for key in forty)
    # each table printed as its section ended, before the next one started
    assert proc.stdout.index("## Falcon-7B shape") < proc.stdout.index("[40b, 1 layer(s)]")


@pytest.mark.slow
def test_attention_benchmark_runs_every_way_and_names_the_one_attend_takes():
    import subprocess

    command = [sys.executable, str(REPO / "benchmarks" / "attention.py"), "--length", "64"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line.strip("| ") for line in proc.stdout.splitlines() if line.startswith(("| 7b", "| 40b"))]
    rows = [line.split(" | ") for line in lines]
    ways = [row[1] for row in rows]
    assert ways == ["transformers", "expand", "gqa", "attend (expand)", "transformers", "gqa", "groups", "attend (gqa)"]
    assert all(int(row[2].replace(",", "")) >= 0 and float(row[3]) > 0 for row in rows)  # MiB, and s a pass


@pytest.mark.slow
def test_serve_benchmark_drives_both_servers_and_the_queue_with_no_failures(tmp_path):
    """`benchmarks/serve.py --quick --only tiny`: the real server, batched and one at a time, every request answered;
    past the queue's limit, 503s with Retry-After and nothing else."""
    import json
    import subprocess

    out = tmp_path / "serve.json"
    command = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick", "--only", "tiny", "--json", str(out)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    tiny = json.loads(out.read_text())["tiny"]
    for side in ("batched", "one at a time"):
        s = tiny["sides"][side]
        assert s["ok"] == s["asked"] == 8 and s["errors"] == 0 and s["usage"], (side, s)
        assert s["tokens_per_sec"] > 0 and s["ttft"]["50"] <= s["end"]["50"], (side, s)
    assert tiny["same_text"] == [8, 8]  # greedy: a batch answers as one request alone does
    at_limit, past = tiny["queue"]
    assert at_limit[1] == at_limit[2] == 16 and at_limit[-1] == "pass", at_limit  # Q at once: every one answered
    assert past[4] == "none" and past[3] > 0 and past[-1] == "pass", past  # 503s, never a failure
