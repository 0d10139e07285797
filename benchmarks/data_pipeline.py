"""CPU: the data pipeline. Rows/s of tokenization and caching, padding efficiency, and what it buys in `fit`.

- **Tokenize and cache**: `prepare_data` on a fresh cache (load, check, tokenize, write), then `setup`
  on the warm cache, on the shipped samples repeated to a realistic size.
- **Padding efficiency**: real tokens / all tokens over one epoch of the real train loader, for the
  shipped Midjourney and guanaco samples at their configs' settings, with `data.batching` padded,
  grouped and packed. The guanaco sample is also measured repeated 300x (9,600 rows, about the size of
  openassistant-guanaco), where packing has enough rows to fill its sequences.
- **Speed**: `fit` tokens/s (real tokens) on configs/tiny.yaml with each `data.batching`, alternating.

The tokenizer is the tiny one shipped with the package (the real Falcon tokenizer needs the Hub), so
token counts are the tiny tokenizer's: about 1.5-2x Falcon's on English text.

    python benchmarks/data_pipeline.py [--speed-steps 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, alternate, floor_rate, median, table

ASSETS = REPO / "lightning_falcon" / "assets" / "data"
# sample -> (file, the config whose data settings it is measured with, extra datamodule settings)
SAMPLES = {
    "midjourney (360 rows)": (ASSETS / "midjourney.jsonl", "configs/tiny.yaml", {}),
    "guanaco sample (32 rows)": (ASSETS / "guanaco-sample.jsonl", "configs/falcon-7b-guanaco.yaml", {}),
}


def data_settings(config: str, path: Path) -> dict:
    import yaml

    settings = yaml.safe_load((REPO / config).read_text())["data"]
    settings.update(dataset=str(path), tokenizer="asset:tiny-falcon", split="train")
    return settings


def repeated(path: Path, times: int, directory: str) -> Path:
    rows = path.read_text().splitlines()
    out = Path(directory) / f"{path.stem}-x{times}.jsonl"
    out.write_text("\n".join(rows * times) + "\n")
    return out


def tokenize_rate(path: Path, config: str, directory: str) -> dict:
    from lightning_falcon.data import PromptDataModule

    dm = PromptDataModule(**data_settings(config, path), cache_dir=str(Path(directory) / f"cache-{path.stem}"))
    dm._tokenizer()  # loading the tokenizer is not per-row work
    start = time.perf_counter()
    dm.prepare_data()
    cold = time.perf_counter() - start
    rows = len(path.read_text().splitlines())
    start = time.perf_counter()
    dm.setup("fit")
    warm = time.perf_counter() - start
    return {"rows": rows, "rows_per_sec": rows / cold, "prepare_s": cold, "setup_s": warm}


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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rates = []
        for name, times in (("midjourney", 50), ("guanaco-sample", 300)):
            path, config, _ = next(v for k, v in SAMPLES.items() if k.startswith(name.split("-")[0]))
            r = tokenize_rate(repeated(path, times, tmp), config, tmp)
            rates.append(
                [
                    f"{name} x{times}",
                    f"{r['rows']:,}",
                    f"{r['rows_per_sec']:,.0f}",
                    f"{r['prepare_s']:.2f}",
                    f"{r['setup_s']:.2f}",
                ]
            )
        print("## Tokenize and cache\n")
        print(table(["data", "rows", "rows/s (prepare_data, cold)", "prepare_data s", "setup s (warm cache)"], rates))

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
