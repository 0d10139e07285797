"""`python -m lightning_falcon evaluate --config X --ckpt_path CKPT`: did fine-tuning help, and how?

One process, one device, one load of the base. The held-out split is validated and the query file
(`generation.queries`) predicted twice, first with the adapter and then with it switched off (the base);
both run in Lightning's loops, so generation runs on the model's own device. The Markdown report gives:
- loss and perplexity, base against fine-tuned; for a preference objective (`model.objective` dpo, ipo, orpo) on
  preference pairs, its loss (against the base as the reference) and the held-out preference accuracy and margin:
  how often, and by how many nats, each model gives the chosen answer the higher log-probability;
- the mean output length and the share of outputs that ended at EOS;
- per level (easy / intermediate / advanced), each query's base output next to the fine-tuned one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from lightning_falcon.commands.cli import SINGLE_DEVICE, FalconCLI, build
from lightning_falcon.data.inputs import Query, read_queries
from lightning_falcon.errors import ConfigError
from lightning_falcon.model import FalconQLoRA
from lightning_falcon.model.generation import Generated, GenerationSettings
from lightning_falcon.model.preference import PAIRED
from lightning_falcon.runs import RunDir
from lightning_falcon.training.samples import markdown_cell


class EvaluateCLI(FalconCLI):
    logs = False

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="A checkpoint, `last`, or an adapter directory"
        )
        parser.add_argument(
            "--report",
            type=str | None,
            default=None,
            help="Markdown report to write; default evaluation.md in the run",
        )

    def before_instantiate_classes(self) -> None:
        """Read the queries (a bad query file fails before any weights load, reported with the other problems by
        `evaluate`): their texts are what the model is asked, predict's inputs."""
        super().before_instantiate_classes()
        self.queries, self.problems = [], []
        try:
            self.queries = read_queries(self.config.generation.queries)
        except ConfigError as e:
            self.problems.append(str(e))
        self.config.generation.input_file = None
        self.config.generation.inputs = [q.input for q in self.queries]

    def product_callbacks(self, generation: GenerationSettings, lr_monitor: bool) -> list:
        return []  # the report is the output: no samples logged, no predictions file, no adapter saved


def evaluate(args: list[str]) -> Path:
    """Parse, check everything cheap, then validate and generate twice and write the report."""
    # The report is the output: no config.yaml beside it (nor in the cwd).
    cli = build(EvaluateCLI, [*args, *SINGLE_DEVICE], "evaluate", run=False, save_config_callback=None)
    config, queries = cli.config_init, cli.queries
    problems = list(cli.problems)
    if cli.asked is None:
        problems.insert(0, "evaluate needs --ckpt_path. Fix: give a .ckpt file, `last`, or a run's adapter directory")
    ConfigError.collect(problems)
    source = cli.one_device_source("evaluate")
    report = Path(config["report"]) if config.get("report") else RunDir.of_source(source).evaluation
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer

    results = {}
    for name, weights in (("fine-tuned", contextlib.nullcontext()), ("base", model.base_only())):
        with weights:
            metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
            predicted = trainer.predict(model, datamodule=datamodule, return_predictions=True)
        outputs = [generated for batch in predicted for _, generated in batch]
        results[name] = {
            "loss": float(metrics["val/loss"]),
            # pairs: how often, and by how much, the model itself prefers the chosen answer
            **(
                {key: float(metrics[f"val/preference/{key}"]) for key in ("accuracy", "margin")}
                if model.hparams.objective in PAIRED
                else {}
            ),
            # several data sources: each one's loss, so the report shows whether one skill gained at another's cost
            "sources": {source: float(metrics[f"val/loss/{source}"]) for source in model.source_names},
            "outputs": outputs,
        }
    text = render(queries, results, source, model, datamodule)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    report.with_suffix(".json").write_text(json.dumps(as_json(queries, results), indent=2, ensure_ascii=False) + "\n")
    for name, r in results.items():
        stats = output_stats(r["outputs"])
        scores = (
            f"preference accuracy {r['accuracy']:.3f}, margin {r['margin']:.2f} nats"
            if "accuracy" in r
            else f"perplexity {math.exp(r['loss']):.2f}"
        )
        rank_zero_info(
            f"[evaluate] {name}: val loss {r['loss']:.4f}, {scores}, "
            f"mean output {stats['mean_tokens']:.1f} tokens, ended at EOS {stats['eos']}/{stats['n']}"
        )
    rank_zero_info(f"[evaluate] wrote {report} and {report.with_suffix('.json').name}")
    return report


def output_stats(outputs: list[Generated]) -> dict:
    n = len(outputs)
    return {
        "n": n,
        "mean_tokens": sum(o.new_tokens for o in outputs) / n,
        "mean_words": sum(len(o.text.split()) for o in outputs) / n,
        "eos": sum(o.stopped_at_eos for o in outputs),
    }


def as_json(queries: list[Query], results: dict) -> dict:
    return {
        name: {
            "val_loss": r["loss"],
            **(
                {"preference_accuracy": r["accuracy"], "preference_margin": r["margin"]}
                if "accuracy" in r
                else {"val_perplexity": math.exp(r["loss"])}
            ),
            "val_loss_by_source": r["sources"],
            **output_stats(r["outputs"]),
            "outputs": [
                {"level": q.level, "input": q.input, "output": o.text, "tokens": o.new_tokens, "eos": o.stopped_at_eos}
                for q, o in zip(queries, r["outputs"], strict=True)
            ],
        }
        for name, r in results.items()
    }


def render(queries: list[Query], results: dict, source: Path, model: FalconQLoRA, datamodule) -> str:
    base, tuned = results["base"], results["fine-tuned"]
    sb, st = output_stats(base["outputs"]), output_stats(tuned["outputs"])
    g = model.generation
    lines = [
        f"# Evaluation of {source}",
        "",
        (
            f"- Base: `{model.hparams.model_name_or_path}` ({model.hparams.quantization}); "
            f"fine-tuned: the base + `{source}`"
        ),
        f"- Held-out split: {datamodule.stats['val']['rows']} rows of "
        + ", ".join(f"`{m.source.dataset}`" for m in datamodule.members),
        (
            f"- Generation: {g.decoding()}, at most {g.max_new_tokens} new tokens, "
            f"repetition penalty {g.repetition_penalty}"
        ),
        f"- Written {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        "## Summary",
        "",
        "| | base | fine-tuned |",
        "|---|---|---|",
        f"| validation loss | {base['loss']:.4f} | {tuned['loss']:.4f} |",
        *(f"| validation loss, {n} | {base['sources'][n]:.4f} | {tuned['sources'][n]:.4f} |" for n in tuned["sources"]),
        *(
            [
                f"| preference accuracy (held-out pairs) | {base['accuracy']:.3f} | {tuned['accuracy']:.3f} |",
                f"| preference margin (nats) | {base['margin']:.2f} | {tuned['margin']:.2f} |",
            ]
            if "accuracy" in tuned
            else [f"| validation perplexity | {math.exp(base['loss']):.2f} | {math.exp(tuned['loss']):.2f} |"]
        ),
        f"| mean output length (tokens) | {sb['mean_tokens']:.1f} | {st['mean_tokens']:.1f} |",
        f"| mean output length (words) | {sb['mean_words']:.1f} | {st['mean_words']:.1f} |",
        (
            f"| outputs ended at EOS | {sb['eos']}/{sb['n']} ({sb['eos'] / sb['n']:.0%}) | "
            f"{st['eos']}/{st['n']} ({st['eos'] / st['n']:.0%}) |"
        ),
        "",
        f"An output that did not end at EOS was cut at {g.max_new_tokens} tokens: the model did not stop by itself.",
    ]
    if "accuracy" in tuned:
        lines += [
            "",
            (
                f"The validation loss is `{model.hparams.objective}`'s, with the base as the reference. Preference "
                "accuracy: the share of held-out pairs whose chosen answer the model gives the higher summed "
                "log-probability; the margin is the mean difference."
            ),
        ]
    levels = list(dict.fromkeys(q.level for q in queries))
    for level in levels:
        lines += ["", f"## {level}", "", "| # | query | base | fine-tuned |", "|---|---|---|---|"]
        for i, (q, b, t) in enumerate(zip(queries, base["outputs"], tuned["outputs"], strict=True), start=1):
            if q.level == level:
                lines.append(f"| {i} | {markdown_cell(q.input)} | {_cell(b)} | {_cell(t)} |")
    return "\n".join(lines) + "\n"


def _cell(output: Generated) -> str:
    return markdown_cell(output.text) + ("" if output.stopped_at_eos else " *(cut)*")
