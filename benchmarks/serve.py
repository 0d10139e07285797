"""CPU: `serve` under load: streaming clients on localhost, batched against one request at a time, and the queue.

The real server (`python -m lightning_falcon serve`) runs as a child process on a free port; this process waits
for GET /health, drives it, and always stops it at the end. Two models:

- the tiny model with its trained adapter (served as "tuned"): trained here first (`fit --config configs/tiny.yaml
  --trainer.max_steps 50`, in the work directory) unless `--adapter DIR` gives one;
- the Falcon-7B shape (configs/falcon-7b-qlora.yaml at falcon-7b's width, heads and vocabulary) with 2 of its 32
  layers, random weights (`--model.random_init true`, written once into the work directory) and no adapter
  ("base"), with what a CPU needs (fp32 compute, `--trainer.accelerator cpu`) and the shipped tiny tokenizer:
  no Falcon tokenizer is reachable offline, so most of the ids a random 65,024-way model picks decode to nothing:
  its tokens are counted from the server's usage, and its TTFT is over the requests whose answer had any text
  (the table says how many).

Each model is served twice in turn, with the same clients and prompts: batched (`--max_batch_size B`) and one
request at a time (`--max_batch_size 1`), both with `--max_queue Q`. `C` clients (asyncio, one httpx connection
each) send `R` requests each, one after another: POST /v1/chat/completions, stream true, temperature 0, a fixed
max_tokens, every prompt distinct (the shipped Midjourney requests), `stream_options.include_usage` asked for. No
client starts a request after `--time-limit` seconds, and whatever still runs `--grace` seconds later is cut off
(and counted). One untimed request first takes the first-call costs.

Per request: the time to the first chunk carrying text (TTFT) and to `data: [DONE]` (end), from the request's
start; its tokens from the last chunk's `usage.completion_tokens` (else one a text chunk). Requests/s and
generated tokens/s are over the wall time from the first request's start to the last one's end. p50 / p99 are
nearest-rank percentiles over the completed requests (with under 100 of them, p99 is the slowest). The clients
share this machine's cores with the server, as a local client would.

The queue check (tiny model, batched server): exactly Q concurrent requests (`--max_queue` counts every request in,
waiting or answered) must all get 200 and a complete stream; a burst of `--burst` times Q must get only 200s and
503s, some 503s, each carrying Retry-After: no connection error, no 500, no broken stream. A failed check prints
CHECK FAILED and the script exits 1.

    python benchmarks/serve.py                   # about 8 minutes on 2 cores
    python benchmarks/serve.py --quick           # a few short requests: checks that the harness runs
    python benchmarks/serve.py --only tiny --adapter runs/tiny/version_0/adapter --workdir /tmp/serve-bench
    python benchmarks/serve.py --quick --json serve.json    # also every figure and check as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from common import REPO, TINY_CONFIG, device_line, table, versions

try:
    import httpx
except ImportError:  # the same client under its newer name, where only that is installed
    import httpx2 as httpx

CONFIG_7B = REPO / "configs" / "falcon-7b-qlora.yaml"
PROMPTS = REPO / "lightning_falcon" / "assets" / "data" / "midjourney.jsonl"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAILED: list[str] = []  # the checks that failed, and the parts that could not run
RESULTS: dict = {}  # what --json writes: each model's summaries, queue rows and checks


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fail(message: str) -> None:
    FAILED.append(message)
    say(f"CHECK FAILED: {message}")


def falcon(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_falcon", *args]


# ----------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


@contextmanager
def server(args: list[str], cwd: Path, log: Path, timeout: float):
    """`serve ARGS` on a free localhost port, ready (GET /health answers 200): yields (base URL, seconds to
    ready). Stopped at the end whatever happens: SIGTERM, then SIGKILL after 30 s."""
    port = free_port()
    command = falcon("serve", *args, "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, start_new_session=True
        )
    try:
        while True:
            if proc.poll() is not None:
                raise ServerError(f"serve exited ({proc.returncode}) before /health answered:\n{tail(log)}")
            if time.perf_counter() - start > timeout:
                raise ServerError(f"serve did not answer /health within {timeout:.0f} s:\n{tail(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        yield url, time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                say(f"serve ignored SIGTERM for 30 s: killed (pid {proc.pid})")
                proc.kill()
                proc.wait()


def tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------- the clients
def prompts(n: int, offset: int = 0) -> list[str]:
    """`n` distinct requests from the shipped Midjourney data (the tiny adapter's own kind of request)."""
    unique = list(dict.fromkeys(json.loads(line)["prompt"] for line in PROMPTS.open()))
    # past the shipped ones, numbered: still distinct
    return [unique[i % len(unique)] + (f" #{i}" if i >= len(unique) else "") for i in range(offset, offset + n)]


async def request(client, model: str, prompt: str, max_tokens: int, origin: float) -> dict:
    """One streamed chat completion: its status, TTFT and end (seconds from its start), tokens and text."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = {"prompt": prompt, "status": None, "ttft": None, "end": None, "usage": None, "chunks": 0, "text": ""}
    out.update(finish=None, done=False, retry_after=None, error=None)
    start = time.perf_counter()
    out["start"] = start - origin
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            out["status"], out["retry_after"] = response.status_code, response.headers.get("retry-after")
            if response.status_code != 200:
                out["error"] = (await response.aread()).decode(errors="replace")[:300]
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        out["done"] = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out["error"] = json.dumps(chunk["error"])[:300]
                    if chunk.get("usage"):
                        out["usage"] = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if out["ttft"] is None:
                                out["ttft"] = time.perf_counter() - start
                            out["chunks"] += 1
                            out["text"] += text
                        out["finish"] = choice.get("finish_reason") or out["finish"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["end"] = time.perf_counter() - start
    out["stop"] = out["start"] + out["end"]
    return out


def outcome(r: dict) -> str:
    """ok | broken stream | 503 + Retry-After | 503 without Retry-After | HTTP N | connection error."""
    if r["status"] is None:
        return "connection error"
    if r["status"] == 200:
        return "ok" if r["done"] and r["error"] is None else "broken stream"
    if r["status"] == 503:
        return "503 + Retry-After" if r["retry_after"] else "503 without Retry-After"
    return f"HTTP {r['status']}"


def tokens(r: dict) -> int:
    return r["usage"] if r["usage"] is not None else r["chunks"]


def http_client(url: str, connections: int, timeout: float):
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout, connect=30))


async def drive(url: str, model: str, asks: list[str], clients: int, each: int, max_tokens: int, limit: float,
                grace: float) -> dict:  # fmt: skip
    """`clients` clients, each sending its `each` prompts of `asks` one after another; none starts one after
    `limit` seconds, and whatever still runs `grace` seconds later is cut off."""
    results: list[dict] = []
    async with http_client(url, clients, limit + grace) as client:
        await request(client, model, "Midjourney prompt for a warm-up", max_tokens, time.perf_counter())
        origin = time.perf_counter()
        deadline = origin + limit

        async def one_client(c: int) -> None:
            for prompt in asks[c * each : (c + 1) * each]:
                if time.perf_counter() > deadline:
                    return
                results.append(await request(client, model, prompt, max_tokens, origin))

        tasks = [asyncio.create_task(one_client(c)) for c in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=limit + grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {"results": results, "cut_off": len(pending), "asked": clients * each}


async def burst(url: str, model: str, asks: list[str], max_tokens: int, timeout: float) -> list[dict]:
    """Every prompt of `asks` at once, each on its own connection."""
    async with http_client(url, len(asks), timeout) as client:
        origin = time.perf_counter()
        return await asyncio.gather(*(request(client, model, p, max_tokens, origin) for p in asks))


async def served_models(url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]]


# ----------------------------------------------------------------- figures
def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least p % of them at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)] if ordered else None


def summary(run: dict) -> dict:
    ok = [r for r in run["results"] if outcome(r) == "ok"]
    wall = max((r["stop"] for r in ok), default=0.0) - min((r["start"] for r in ok), default=0.0)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    end = [r["end"] for r in ok]
    return {
        "ok": len(ok),
        "errors": len(run["results"]) - len(ok),
        "cut_off": run["cut_off"],
        "asked": run["asked"],
        "wall": wall,
        "requests_per_sec": len(ok) / wall if wall else None,
        "tokens_per_sec": sum(map(tokens, ok)) / wall if wall else None,
        "tokens": sum(map(tokens, ok)),
        "ttft": {p: percentile(ttft, p) for p in (50, 99)},
        "ttft_missing": len(ok) - len(ttft),
        "end": {p: percentile(end, p) for p in (50, 99)},
        "usage": all(r["usage"] is not None for r in ok),
        "finish": sorted({str(r["finish"]) for r in ok}),
        "outcomes": counts(run["results"]),
    }


def counts(results: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[outcome(r)] = out.get(outcome(r), 0) + 1
    return dict(sorted(out.items()))


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:,.0f}"


def rate(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ttft_cells(s: dict) -> list[str]:
    """p50 and p99 TTFT, saying over how many requests where some streamed no text."""
    seen = s["ok"] - s["ttft_missing"]
    of = f" ({seen} of {s['ok']})" if s["ttft_missing"] and seen else ""
    return [ms(s["ttft"][p]) + of for p in (50, 99)]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def load_table(label: str, sides: dict[str, dict], clients: int, each: int) -> str:
    rows = []
    for name, s in sides.items():
        done = f"{s['ok']}/{s['asked']}" + (f" ({s['cut_off']} cut off)" if s["cut_off"] else "")
        rows.append([
            label, name, f"{clients} x {each}", done, s["errors"], f"{s['wall']:.1f}", rate(s["requests_per_sec"]),
            rate(s["tokens_per_sec"], 1), *ttft_cells(s), ms(s["end"][50]), ms(s["end"][99]),
        ])  # fmt: skip
    if len(sides) == 2:
        (_, a), (_, b) = sides.items()
        whole = not (a["ttft_missing"] or b["ttft_missing"])  # TTFT over the same requests on both sides
        rows.append([
            label, "batched / one at a time", "", "", "", "", ratio(a["requests_per_sec"], b["requests_per_sec"]),
            ratio(a["tokens_per_sec"], b["tokens_per_sec"]),
            *(ratio(a["ttft"][p], b["ttft"][p]) if whole else "n/a" for p in (50, 99)),
            *(ratio(a["end"][p], b["end"][p]) for p in (50, 99)),
        ])  # fmt: skip
    header = ["model", "server", "clients x requests", "completed", "errors", "wall (s)", "requests/s", "tokens/s"]
    header += ["TTFT p50 (ms)", "TTFT p99 (ms)", "end p50 (ms)", "end p99 (ms)"]
    return table(header, rows)


# ----------------------------------------------------------------- the two models
def tiny_adapter(work: Path, given: str | None) -> Path:
    """`--adapter`, else the newest adapter already trained in `work`, else one trained now (50 steps)."""
    if given:
        return Path(given).resolve()
    trained = sorted((work / "runs" / "tiny").glob("version_*/adapter"), key=lambda p: int(p.parent.name[8:]))
    if trained:
        return trained[-1]
    command = falcon(
        "fit", "--config", str(TINY_CONFIG), "--trainer.max_steps", "50", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--data.cache_dir", str(work / "cache"),
    )  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    if proc.returncode != 0:
        raise ServerError(f"fit of the tiny adapter failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    say(f"[serve-bench] tiny adapter trained (50 steps) in {time.perf_counter() - start:.0f} s")
    return tiny_adapter(work, None)


def shape_7b_arguments(work: Path) -> list[str]:
    """serve's arguments for configs/falcon-7b-qlora.yaml at falcon-7b's shape with 2 layers, random weights."""
    from shapes import falcon_shape

    shape = falcon_shape("7b", 2, work)
    return [
        "--config", str(CONFIG_7B), "--model.model_name_or_path", str(shape), "--model.random_init", "true",
        "--model.random_init_dir", str(work / "random"), "--data.tokenizer", "asset:tiny-falcon",
        "--model.compute_dtype", "fp32", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
    ]  # fmt: skip


def measure(label: str, model: str, base: list[str], work: Path, sizes: argparse.Namespace, queue_check: bool) -> dict:
    """Both servers in turn (batched, then one at a time) under the same clients and prompts; the queue check on
    the batched one. Returns {'sides': {name: summary}, 'runs': ..., 'ready': ..., 'queue': ...}."""
    asks = prompts(sizes.clients * sizes.requests)
    settings = {"batched": sizes.batch, "one at a time": 1}
    out: dict = {"sides": {}, "runs": {}, "ready": {}, "queue": None}
    for name, batch in settings.items():
        args = [*base, "--max_batch_size", str(batch), "--max_queue", str(sizes.queue)]
        log = work / f"serve-{label}-batch{batch}.log"
        say(f"[serve-bench] {label}: serve --max_batch_size {batch} --max_queue {sizes.queue} (log {log})")
        with server(args, work, log, sizes.start_timeout) as (url, ready):
            listed = asyncio.run(served_models(url))
            if model not in listed:
                raise ServerError(f"model {model!r} is not served: /v1/models lists {listed}")
            run = asyncio.run(
                drive(url, model, asks, sizes.clients, sizes.requests, sizes.max_tokens, sizes.time_limit, sizes.grace)
            )
            out["runs"][name], out["sides"][name], out["ready"][name] = run, summary(run), ready
            say(f"[serve-bench] {label} {name}: {out['sides'][name]['outcomes']} in {out['sides'][name]['wall']:.1f} s")
            if queue_check and batch > 1:
                out["queue"] = check_queue(url, model, batch, sizes)
    return out


def check_queue(url: str, model: str, batch: int, sizes: argparse.Namespace) -> list[list]:
    """Q requests at once (the limit), then `burst` times that: rows of the queue table."""
    limit = sizes.queue
    rows = []
    for name, n in [("at the limit (Q)", limit), (f"burst ({sizes.burst} x the limit)", sizes.burst * limit)]:
        asks = prompts(n, offset=1000)
        results = asyncio.run(burst(url, model, asks, sizes.queue_tokens, sizes.time_limit + sizes.grace))
        c = counts(results)
        ok = c.get("ok", 0)
        rejected = c.get("503 + Retry-After", 0)
        others = {k: v for k, v in c.items() if k not in ("ok", "503 + Retry-After")}
        if n <= limit:
            verdict = "pass" if ok == n else "FAIL: not every request at the limit completed"
        elif others:
            verdict = "FAIL: failures other than 503 + Retry-After"
        elif not rejected:
            verdict = "FAIL: no 503 past the limit"
        else:
            verdict = "pass"
        if verdict != "pass":
            fail(f"queue check {name}: {c}; {[r['error'] for r in results if outcome(r) != 'ok'][:3]}")
        retry = sorted({r["retry_after"] for r in results if r["retry_after"]})
        fast = [r["end"] for r in results if r["status"] == 503]
        rows.append([
            name, n, ok, rejected, ", ".join(f"{k} {v}" for k, v in others.items()) or "none",
            ", ".join(retry) or "-", ms(percentile(fast, 50)) if fast else "-", verdict,
        ])  # fmt: skip
    return rows


# ----------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few short requests: the harness runs, figures rough")
    parser.add_argument("--only", choices=["tiny", "7b"], help="one model (default: both)")
    parser.add_argument("--adapter", help="the tiny model's trained adapter (default: trained here, 50 steps)")
    parser.add_argument("--workdir", help="keeps the tiny adapter, the 7B random checkpoint and the server logs")
    parser.add_argument("--batch", type=int, default=8, help="the batched server's --max_batch_size (B)")
    parser.add_argument("--queue", type=int, default=16, help="both servers' --max_queue (Q)")
    parser.add_argument("--clients", type=int, default=8, help="tiny: concurrent clients (at most Q)")
    parser.add_argument("--requests", type=int, default=8, help="tiny: requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=32, help="tiny: max_tokens of every request")
    parser.add_argument("--clients-7b", type=int, default=4)
    parser.add_argument("--requests-7b", type=int, default=1)
    parser.add_argument("--max-tokens-7b", type=int, default=8)
    parser.add_argument("--queue-tokens", type=int, default=32, help="max_tokens of the queue check's requests")
    parser.add_argument("--burst", type=int, default=4, help="the queue check's burst, in multiples of Q")
    parser.add_argument("--time-limit", type=float, default=180, help="seconds a timed run may start requests")
    parser.add_argument("--grace", type=float, default=120, help="seconds past --time-limit before a cut-off")
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds for a server to answer /health")
    parser.add_argument("--json", help="also write every figure and check to this file")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.queue_tokens = 4, 2, 8, 16
        args.clients_7b, args.requests_7b, args.max_tokens_7b = 2, 1, 4
        args.time_limit, args.grace = 60, 60
    if args.clients > args.queue:
        parser.error("--clients must be at most --queue: the server answers 503 past that")

    RESULTS.update(device=device_line(), versions=f"{versions()}, httpx {httpx.__version__}")
    print(f"device {RESULTS['device']} | {RESULTS['versions']}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "tiny"):
            tiny(work, args)
        if args.only in (None, "7b"):
            shape_7b(work, args)
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({**RESULTS, "failed": FAILED}, indent=2) + "\n")
    if FAILED:
        say("\n".join(["", "FAILED:", *FAILED]))
        return 1
    return 0


def tiny(work: Path, args: argparse.Namespace) -> None:
    title = '## Tiny model + its adapter ("tuned")'
    try:
        adapter = tiny_adapter(work, args.adapter)
        base = ["--config", str(TINY_CONFIG), "--ckpt_path", str(adapter)]
        out = measure("tiny", "tuned", base, work, args, queue_check=True)
    except ServerError as e:
        print(f"\n{title}\n\nnot measured: {e}")
        return fail(f"tiny: {str(e).splitlines()[0]}")
    print(f"\n{title}\n")
    sizes = f"max_tokens {args.max_tokens}, B {args.batch}, Q {args.queue}"
    report(out, "tiny", args.clients, args.requests, args.max_tokens, sizes)
    RESULTS["tiny"]["queue"] = out["queue"]
    if out["queue"] is not None:
        print(
            f"\nQueue check on the batched server (--max_batch_size {args.batch} --max_queue {args.queue}), every "
            f"request at once, max_tokens {args.queue_tokens}:\n"
        )
        header = ["check", "requests at once", "200, complete", "503 + Retry-After", "anything else", "Retry-After"]
        print(table([*header, "503 answered in (ms, p50)", "verdict"], out["queue"]))


def shape_7b(work: Path, args: argparse.Namespace) -> None:
    title = '## Falcon-7B shape, 2 layers, random weights, no adapter ("base")'
    sizes = argparse.Namespace(**{**vars(args), "clients": args.clients_7b, "requests": args.requests_7b})
    sizes.max_tokens = args.max_tokens_7b
    try:
        out = measure("7b-2layers", "base", shape_7b_arguments(work), work, sizes, queue_check=False)
    except ServerError as e:
        print(f"\n{title}\n\nnot measured: {e}")
        return fail(f"7b: {str(e).splitlines()[0]}")
    print(f"\n{title}\n")
    detail = f"max_tokens {sizes.max_tokens}, B {args.batch}, Q {args.queue}"
    report(out, "7b, 2 layers", sizes.clients, sizes.requests, sizes.max_tokens, detail)


def report(out: dict, label: str, clients: int, each: int, max_tokens: int, detail: str) -> None:
    sides = out["sides"]
    RESULTS[label.split(",")[0]] = {"sides": sides, "ready": out["ready"]}
    print(load_table(label, sides, clients, each))
    for name, s in sides.items():
        if s["errors"]:
            fail(f"{label} {name}: {s['errors']} failed requests below the queue's limit: {s['outcomes']}")
    a, b = (out["runs"][n]["results"] for n in sides)
    texts = {r["prompt"]: r["text"] for r in b if outcome(r) == "ok"}
    common = [r for r in a if outcome(r) == "ok" and r["prompt"] in texts]
    same = sum(r["text"] == texts[r["prompt"]] for r in common)
    RESULTS[label.split(",")[0]]["same_text"] = [same, len(common)]
    source = "usage" if all(s["usage"] for s in sides.values()) else "text chunks (no usage in the stream)"
    missing = sum(s["ttft_missing"] for s in sides.values())
    totals = ", ".join(f"{n} {s['tokens']:,}" for n, s in sides.items())
    print(
        f"\n{detail}; tokens from {source}, {totals}; "
        f"finish reasons {sorted({f for s in sides.values() for f in s['finish']})}; seconds to /health: "
        + ", ".join(f"{n} {t:.1f}" for n, t in out["ready"].items())
        + f"; the same text batched and one at a time for {same} of {len(common)} prompts"
        + (f"; {missing} completed requests streamed no text (no TTFT)" if missing else "")
    )


if __name__ == "__main__":
    sys.exit(main())
