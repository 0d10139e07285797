"""CPU: one attention forward and backward alone, at Falcon-7B's and Falcon-40B's head layouts, each way beside
transformers' own.

Batch 1, 2,048 tokens, 64 dimensions a head, fp32, with a boolean causal mask (transformers' Falcon always
passes one): 71 query heads over one key/value head (7B) and 128
query heads over 8 groups (40B). The ways of model/attention.py, and transformers' own:

- `transformers`: what transformers 5.24's Falcon hands SDPA: 7B's one key/value head without `enable_gqa`
  (the math kernel); 40B's keys and values copied to every query head (a fused kernel);
- `expand`, `gqa`, `groups`: model/attention.py's ways, each forced (`attend` picks one by itself);
- `attend`: what `attend` picks on this machine.

Each way runs in its own process, 3 forward and backward passes (the first left out of the time); the figure
is the peak anonymous memory (RssAnon) above the inputs, and seconds a pass.

    python benchmarks/attention.py [--length 2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import AnonPeak, device_line, report, run_worker, table, versions

LAYOUTS = {"7b": (71, 1), "40b": (128, 8)}
WAYS = ("transformers", "expand", "gqa", "groups", "attend")


def worker(layout: str, way: str, length: int, passes: int = 3) -> None:
    import torch
    import torch.nn.functional as F

    from lightning_falcon.model.attention import attend, per_group, route

    heads, kv_heads = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, length, 64, generator=g).requires_grad_()
    key, value = (torch.randn(1, kv_heads, length, 64, generator=g).requires_grad_() for _ in range(2))
    mask = torch.ones(length, length, dtype=torch.bool).tril()

    def once():
        if way == "transformers" and kv_heads == 1:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        if way == "transformers":
            copied = [x.repeat_interleave(heads // kv_heads, dim=1) for x in (key, value)]
            return F.scaled_dot_product_attention(query, *copied, attn_mask=mask)
        if way == "gqa":
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
        if way in ("expand", "groups"):
            return per_group(query, key, value, mask, False)
        return attend(query, key, value, mask)

    peak = AnonPeak()
    peak.start()
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        once().sum().backward()
        seconds.append(time.perf_counter() - start)
    memory = peak.stop()
    chosen = route(query, key, value, mask) if way == "attend" else way
    report({**memory, "seconds": sum(seconds[1:]) / (passes - 1), "way": chosen})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--worker", nargs=2, metavar=("LAYOUT", "WAY"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.length)
    rows = []
    for layout, (heads, kv_heads) in LAYOUTS.items():
        ways = [w for w in WAYS if not (w == "expand" and kv_heads > 1) and not (w == "groups" and kv_heads == 1)]
        for way in ways:
            r = run_worker(Path(__file__), "--length", str(args.length), "--worker", layout, way)
            rows.append([
                f"{layout}: {heads} heads / {kv_heads} key/value", way if way != "attend" else f"attend ({r['way']})",
                f"{r['anon_peak_mib'] - r['anon_before_mib']:,.0f}", f"{r['seconds']:.3f}",
            ])  # fmt: skip
    print(f"{device_line()}; {versions()}")
    print(f"batch 1 x {args.length} tokens, head dim 64, boolean causal mask, fp32; forward + backward\n")
    print(table(["layout", "way", "peak above the inputs, MiB", "s a pass"], rows))


if __name__ == "__main__":
    sys.exit(main())
