"""CPU: the data pipeline. Rows/s of tokenization and caching, padding efficiency, and what it buys in `fit`.

- **Tokenize and cache**: `prepare_data` on a fresh cache (load, check, tokenize, write), then `setup`
  on the warm cache, on the shipped samples repeated to a realistic size, with the peak anonymous
  memory sampled during `prepare_data` (this process's RssAnon; the Pss_Anon of it and its tokenizing
  workers together). `--synthetic-rows 100000 1000000` adds the
  Midjourney sample repeated to that many rows, to show the rate at scale and memory flat in the rows.
- **`messages` beside `prompt_response`**: the same Midjourney pairs as `prompt_response` rows and as
  `messages` rows (the user asks the prompt, the assistant answers), repeated to `--format-rows` rows, each
  through configs/tiny.yaml's data settings and chat template: cold `prepare_data` rows/s, `--format-repeats`
  runs a side, alternating (A B, B A, ...), each on a file and caches of its own. Both must give the same
  tokens and labels, which the run checks.
- **Padding efficiency**: real tokens / all tokens over one epoch of the real train loader, for the
  shipped Midjourney and guanaco samples at their configs' settings, with `data.batching` padded,
  grouped and packed. The guanaco sample is also measured repeated 300x (9,600 rows, about the size of
  openassistant-guanaco), where packing has enough rows to fill its sequences.
- **Speed**: `fit` tokens/s (real tokens) on configs/tiny.yaml with each `data.batching`, alternating.

The tokenizer is the tiny one shipped with the package (the real Falcon tokenizer needs the Hub), so
token counts are the tiny tokenizer's: about 1.5-2x Falcon's on English text.

    python benchmarks/data_pipeline.py [--speed-steps 200] [--repeats 5] [--synthetic-rows 100000 1000000]
    python benchmarks/data_pipeline.py --tokenize-only --synthetic-rows 100000 1000000 [--num-proc 2]
    python benchmarks/data_pipeline.py --tokenize-only --speed-steps 0 [--format-rows 18000] [--format-repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

from common import REPO, alternate, floor_rate, median, table
from shapes import pss_anon_bytes, rss_anon_bytes

ASSETS = REPO / "lightning_falcon" / "assets" / "data"
# sample -> (file, the config whose data settings it is measured with, extra datamodule settings)
SAMPLES = {
    "midjourney (360 rows)": (ASSETS / "midjourney.jsonl", "configs/tiny.yaml", {}),
    "guanaco sample (32 rows)": (ASSETS / "guanaco-sample.jsonl", "configs/falcon-7b-guanaco.yaml", {}),
}


def data_settings(config: str, path: Path, source: dict | None = None) -> dict:
    """The config's data settings on `path`, the config's one source's settings updated by `source`."""
    import yaml

    settings = yaml.safe_load((REPO / config).read_text())["data"]
    source = {**settings["dataset"], **(source or {}), "dataset": str(path), "split": "train"}
    return {**settings, "dataset": source, "tokenizer": "asset:tiny-falcon"}


def as_messages(path: Path, out: Path) -> Path:
    """`path`'s prompt/response pairs written as OpenAI-style `messages` rows: the user asks the prompt, the
    assistant answers with the response."""
    with path.open() as f, out.open("w") as g:
        for line in f:
            row = json.loads(line)
            turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
            g.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    return out


def repeated(path: Path, times: int, directory: str, rows: int | None = None) -> Path:
    """`path`'s rows repeated `times` times, or cut to `rows` rows when given, written as a file of its own."""
    lines = path.read_text().splitlines()
    if rows is not None:
        times = -(-rows // len(lines))
    out = Path(directory) / f"{path.stem}-{f'{rows}rows' if rows is not None else f'x{times}'}.jsonl"
    with out.open("w") as f:  # one repeat at a time: a million rows need not be held as one string
        left = rows if rows is not None else len(lines) * times
        while left > 0:
            f.write("\n".join(lines[:left]) + "\n")
            left -= min(left, len(lines))
    return out


def children(pid: int | str = "self") -> list[str]:
    """The ids of a process's child processes (its tokenizing workers), from every one of its threads."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # the thread has ended
            found += (task / "children").read_text().split()
    return found


class PeakMemory:
    """Peak memory sampled every 20 ms while open: this process's RssAnon, and the Pss_Anon of this process
    and its child processes (the tokenizing workers) summed, as they are at the same moment."""

    def __enter__(self) -> Self:
        self.own = rss_anon_bytes()
        self.total = pss_anon_bytes("self")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.own = max(self.own, rss_anon_bytes())
            self.total = max(self.total, sum(pss_anon_bytes(pid) for pid in ["self", *children()]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def tokenize_rate(
    path: Path, config: str, directory: str, num_proc: int | None = None, source: dict | None = None, digest=False
) -> dict:
    """Cold `prepare_data` and warm `setup` of `path` with `config`'s data settings (its source's updated by
    `source`); with `digest`, a digest of the train split's ids and labels too (equal data tokenizes alike)."""
    import datasets  # noqa: F401  (importing it, a second or so, is not per-row work)

    from lightning_falcon.data import PromptDataModule
    from lightning_falcon.data.tokenizing import default_processes

    settings = data_settings(config, path, source)
    if num_proc is not None:
        settings["num_proc"] = num_proc
    dm = PromptDataModule(**settings, cache_dir=str(Path(directory) / f"cache-{path.stem}"))
    _ = dm.tokenizer  # loading the tokenizer is not per-row work
    with open(path, "rb") as f:
        rows = sum(1 for _ in f)
    before = rss_anon_bytes()
    start = time.perf_counter()
    with PeakMemory() as peak:
        dm.prepare_data()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    dm.setup("fit")
    warm = time.perf_counter() - start
    train = dm._splits["train"]
    extra = {}
    if digest:
        tokens = train[:]
        text = json.dumps([tokens["input_ids"], tokens["labels"]]).encode()
        extra["tokens_digest"] = hashlib.sha256(text).hexdigest()[:16]
    return {
        "rows": rows,
        "train_rows": len(train),
        "processes": dm.hparams.num_proc or default_processes(len(train)),
        "rows_per_sec": rows / cold,
        "prepare_s": cold,
        "setup_s": warm,
        "rss_anon_before_mib": before / 2**20,
        "rss_anon_peak_mib": peak.own / 2**20,
        "pss_anon_peak_with_workers_mib": peak.total / 2**20,
        **extra,
    }


def format_comparison(directory: str, rows: int, repeats: int, num_proc: int | None) -> dict[str, list[dict]]:
    """Cold `prepare_data` of the Midjourney pairs as `prompt_response` rows and as `messages` rows, `rows` rows
    each, `repeats` runs a side in alternating order, each run on a file, Arrow copy and cache of its own."""
    config = SAMPLES["midjourney (360 rows)"][1]
    pairs = SAMPLES["midjourney (360 rows)"][0]
    samples = {"prompt_response": pairs, "messages": as_messages(pairs, Path(directory) / "midjourney-messages.jsonl")}
    sides = list(samples)
    for kind, sample in samples.items():  # untimed: the first run in a process pays one-time costs
        run = Path(directory) / f"warmup-{kind}"
        run.mkdir()
        tokenize_rate(sample, config, str(run), num_proc, {"format": kind})
        shutil.rmtree(run)
    results: dict[str, list[dict]] = {kind: [] for kind in sides}
    for i in range(repeats):
        for kind in sides if i % 2 == 0 else sides[::-1]:
            run = Path(directory) / f"{kind}-{i}"
            run.mkdir()
            path = repeated(samples[kind], 0, str(run), rows)
            r = tokenize_rate(path, config, str(run), num_proc, {"format": kind}, digest=True)
            shutil.rmtree(run)
            print(json.dumps({"format": kind, "run": i, **r}), flush=True)
            results[kind].append(r)
    digests = {r["tokens_digest"] for runs in results.values() for r in runs}
    if len(digests) != 1:
        raise RuntimeError(f"the two formats tokenized the same pairs differently: {sorted(digests)}")
    return results


def efficiency(path: Path, config: str, batching: str, directory: str) -> dict:
    from lightning_falcon.data import PromptDataModule

    settings = data_settings(config, path)
    dm = PromptDataModule(**{**settings, "batching": batching}, cache_dir=str(Path(directory) / "cache-eff"))
    dm.prepare_data()
    dm.setup("fit")
    real = total = batches = 0
    for batch in dm.train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
        batches += 1
    return {
        "efficiency": real / total,
        "batches": batches,
        "batch_size": settings["batch_size"],
        "max_length": settings["max_length"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed-steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--synthetic-rows",
        type=int,
        nargs="*",
        default=[],
        help="also tokenize the Midjourney sample repeated to each of these many rows (e.g. 100000 1000000)",
    )
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: the datamodule's)")
    parser.add_argument("--tokenize-only", action="store_true", help="only the tokenize-and-cache tables")
    parser.add_argument(
        "--format-rows", type=int, default=18_000, help="rows of each side of messages beside prompt_response"
    )
    parser.add_argument(
        "--format-repeats", type=int, default=3, help="cold runs of each side, alternating (0: leave it out)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # `datasets` keeps an Arrow copy of every file it loads: keep the million-row ones out of the user's cache.
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tmp) / "hf-datasets"))
        midjourney, guanaco = SAMPLES["midjourney (360 rows)"][0], SAMPLES["guanaco sample (32 rows)"][0]
        # (name, sample, times repeated, rows cut to, the config whose data settings apply)
        cases = [
            ("midjourney x50", midjourney, 50, None, "configs/tiny.yaml"),
            ("guanaco-sample x300", guanaco, 300, None, "configs/falcon-7b-guanaco.yaml"),
        ]
        cases += [(f"midjourney to {n:,} rows", midjourney, 0, n, "configs/tiny.yaml") for n in args.synthetic_rows]
        rates = []
        for name, sample, times, rows, config in cases:
            path = repeated(sample, times, tmp, rows)
            r = tokenize_rate(path, config, tmp, args.num_proc)
            path.unlink()
            shutil.rmtree(Path(tmp) / f"cache-{path.stem}")
            print(json.dumps({"data": name, **r}), flush=True)
            rates.append(
                [
                    name,
                    f"{r['rows']:,}",
                    f"{r['rows_per_sec']:,.0f}",
                    f"{r['prepare_s']:.2f}",
                    f"{r['setup_s']:.2f}",
                    f"{r['rss_anon_before_mib']:,.0f}",
                    f"{r['rss_anon_peak_mib']:,.0f}",
                    f"{r['pss_anon_peak_with_workers_mib']:,.0f}",
                ]
            )
        num_proc = args.num_proc if args.num_proc is not None else "default"
        print(f"\n## Tokenize and cache (data.num_proc {num_proc})\n")
        header = ["data", "rows", "rows/s (prepare_data, cold)", "prepare_data s", "setup s (warm cache)"]
        header += ["RssAnon before MiB", "peak RssAnon MiB", "peak Pss_Anon with workers MiB"]
        print(table(header, rates))

        if args.format_repeats:
            results = format_comparison(tmp, args.format_rows, args.format_repeats, args.num_proc)
            rate = {kind: median(runs, "rows_per_sec") for kind, runs in results.items()}
            rows = [
                [
                    f"`{kind}`",
                    f"{runs[0]['rows']:,}",
                    str(runs[0]["processes"]),
                    ", ".join(f"{r['rows_per_sec']:,.0f}" for r in runs),
                    f"{rate[kind]:,.0f}",
                    f"{rate[kind] / rate['prompt_response']:.2f}",
                    f"{max(r['pss_anon_peak_with_workers_mib'] for r in runs):,.0f}",
                ]
                for kind, runs in results.items()
            ]
            print(
                f"\n## messages beside prompt_response: the Midjourney pairs either way, configs/tiny.yaml's "
                f"data settings ({args.format_repeats} cold runs a side, alternating; the same tokens, checked)\n"
            )
            header = ["data.dataset.format", "rows", "processes", "rows/s (prepare_data, cold), by run", "median"]
            header += ["vs prompt_response", "peak Pss_Anon with workers MiB"]
            print(table(header, rows))
            paired = [m["rows_per_sec"] / p["rows_per_sec"] for p, m in zip(*results.values(), strict=True)]
            ratio = rate["messages"] / rate["prompt_response"]
            print(
                f"\nmessages / prompt_response rows/s: {ratio:.3f} (medians); by run pair: "
                + ", ".join(f"{x:.3f}" for x in paired)
            )
        if args.tokenize_only:
            return

        samples = dict(SAMPLES)
        guanaco, config, _ = SAMPLES["guanaco sample (32 rows)"]
        samples["guanaco sample x300 (9,600 rows)"] = (repeated(guanaco, 300, tmp), config, {})
        rows = []
        for name, (path, config, _) in samples.items():
            cells = [name, config]
            for batching in ("padded", "grouped", "packed"):
                e = efficiency(path, config, batching, tmp)
                cells.append(f"{e['efficiency']:.3f} ({e['batches']} batches)")
            cells.insert(2, f"{e['batch_size']} x <= {e['max_length']}")
            rows.append(cells)
        print("\n## Padding efficiency (real tokens / all tokens, one epoch)\n")
        print(table(["data", "settings from", "batch", "padded", "grouped", "packed"], rows))

    if args.speed_steps:
        common = ["--steps", str(args.speed_steps), "--warmup", str(args.warmup)]
        modes = ("padded", "grouped", "packed")
        workers = {m: ["--worker", "fit", *common, "--data.batching", m] for m in modes}
        results = alternate(workers, Path(__file__).with_name("overhead.py"), args.repeats)
        floor = {m: floor_rate(results[m]) for m in modes}
        speed = [
            [
                m,
                f"{floor[m]:,.0f}",
                f"{floor[m] / floor['padded']:.3f}",
                f"{median(results[m], 'tokens_per_sec'):,.0f}",
                f"{results[m][0]['tokens']:,}",
            ]
            for m in modes
        ]
        print(
            f"\n## fit on configs/tiny.yaml by data.batching ({args.speed_steps} steps, "
            f"steps {args.warmup}-{args.speed_steps - 1} timed, {args.repeats} runs each)\n"
        )
        header = ["data.batching", "floor real tokens/s", "vs padded", "median real tokens/s", "real tokens trained"]
        print(table(header, speed))
        print("\n" + json.dumps({m: [round(r["tokens_per_sec"]) for r in results[m]] for m in modes}))


if __name__ == "__main__":
    sys.exit(main())
