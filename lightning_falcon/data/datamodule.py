"""The LightningDataModule: load prompt/response data, tokenize it once into an on-disk cache, batch it.

`prepare_data` (one process per node) loads, checks and tokenizes; `setup` (every rank) reads the
cache. Nothing heavy happens in the constructor, so `--print_config` and every rank stay cheap.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_falcon.data.batching import Batching, PackedRows
from lightning_falcon.data.formats import FormatName, data_format
from lightning_falcon.data.prompts import IGNORE_INDEX, TEMPLATES, prompt_length
from lightning_falcon.data.sampler import ResumableLoader, ResumableSampler
from lightning_falcon.data.sources import empty, load_source, local_file
from lightning_falcon.data.tokenizer import load_tokenizer, special_ids
from lightning_falcon.data.tokenizing import tokenize_split
from lightning_falcon.errors import ConfigError
from lightning_falcon.files import staged_directory

# Part of the cache key: raise it when what a cache entry holds changes (2: the raw `input` text;
# 3: rows with an empty or null field are skipped and counted, not trained on as "None").
CACHE_FORMAT = 3


def _blank(value: Any) -> bool:
    """A field that holds nothing to train on: null (a missing key, an empty CSV cell) or only whitespace."""
    return value is None or not str(value).strip()


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: str,
        val_dataset: str | None = None,
        val_fraction: float = 0.1,
        split: str = "train",
        val_split: str | None = None,
        format: FormatName = "prompt_response",
        prompt_column: str = "prompt",
        response_column: str = "response",
        text_column: str = "text",
        template: str = "instruction",
        human_marker: str = "### Human:",
        assistant_marker: str = "### Assistant:",
        tokenizer: str | None = None,
        max_length: int = 512,
        max_samples: int | None = None,
        batch_size: int = 4,
        batching: Batching = "padded",
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
        cache_dir: str = "~/.cache/lightning_falcon",
    ) -> None:
        """Prompt/response data for causal-LM fine-tuning.

        Args:
            dataset: A local .jsonl/.json/.csv/.parquet file, or a Hub dataset name for `datasets.load_dataset`.
                `asset:NAME` names data shipped with the package (e.g. `asset:data/midjourney.jsonl`).
            val_dataset: Optional separate validation data (same forms as `dataset`).
                Without it, a seeded `val_fraction` of `dataset` is held out.
            val_fraction: Fraction of `dataset` held out for validation when `val_dataset` is not given.
            split: The split to read from a Hub dataset.
            val_split: The split to read from a Hub `val_dataset`; None uses `split`.
            format: `prompt_response`: two columns rendered through `template`;
                `turns`: one `text_column` with turn markers, where only assistant turns train.
            prompt_column: Column holding the request (format `prompt_response`).
            response_column: Column holding the target response (format `prompt_response`).
            text_column: Column holding the whole conversation (format `turns`).
            template: Named prompt template, one of `lightning_falcon.data.prompts.TEMPLATES`.
            human_marker: Marker that opens a human turn (format `turns`).
            assistant_marker: Marker that opens an assistant turn (format `turns`).
            tokenizer: Tokenizer name or directory; defaults to `model.model_name_or_path`.
            max_length: Sequences are cut to this many tokens; the number of cut rows is reported.
            max_samples: Use at most this many rows of `dataset` (for quick runs); None uses all.
            batch_size: Sequences per batch on each device (packed sequences with `batching: packed`).
            batching: How training rows form batches. `padded`: random order, each batch padded to its
                longest row. `grouped`: rows of similar length batched together (less padding, still
                `batch_size` rows per step). `packed`: whole rows packed into sequences of up to `max_length`
                tokens that do not attend to each other (more rows per step), batched by length like
                `grouped`. Validation stays `padded`.
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize in `prepare_data`. None: one per `ROWS_PER_PROCESS` rows of a split
                (lightning_falcon/data/tokenizing.py), at most one per CPU this process may run on.
            seed: Seed of the held-out split and of shuffling.
            cache_dir: Where tokenized data is cached, keyed on the data, the tokenizer and these settings.
        """
        super().__init__()
        self.save_hyperparameters()
        self.format = data_format(self.hparams)
        problems = self.format.problems()
        if val_dataset is None and not 0.0 < val_fraction < 1.0:
            problems.append(
                f"data.val_fraction must be in (0, 1) when data.val_dataset is not set, got {val_fraction}. "
                "Fix: --data.val_fraction 0.1, or set --data.val_dataset"
            )
        if max_length < 2:
            problems.append(f"data.max_length must be at least 2, got {max_length}. Fix: --data.max_length 512")
        if batch_size < 1:
            problems.append(f"data.batch_size must be at least 1, got {batch_size}. Fix: --data.batch_size 4")
        if num_proc is not None and num_proc < 1:
            problems.append(
                f"data.num_proc must be at least 1, got {num_proc}. Fix: --data.num_proc 2, or leave it unset"
            )
        ConfigError.collect(problems)
        self.tokenizer = None
        self.stats: dict[str, dict[str, int]] = {}
        self._splits: dict[str, Any] = {}
        # Set by the CLI for `predict` (generation.inputs / input_file); None generates for the held-out prompts.
        self.predict_inputs: list[str] | None = None

    # ----------------------------------------------------------------- loading and checking
    def _check(self, source: str, ds) -> None:
        missing = [c for c in self.format.columns if c not in ds.column_names]
        if missing:
            raise ConfigError(
                f"dataset {source} lacks column(s) {missing}; it has {ds.column_names}. "
                "Fix: set --data.prompt_column/--data.response_column (or --data.format turns --data.text_column)"
            )
        if len(ds) == 0:
            raise empty(source)

    def _drop_blank(self, source: str, ds) -> tuple[Any, int]:
        """Skip rows with an empty or null field (counted, not trained on as "None"); fail if none are left."""
        kept = ds.filter(
            lambda *columns: [not any(_blank(v) for v in row) for row in zip(*columns)],
            batched=True,
            input_columns=self.format.columns,
        )
        if len(kept) == 0:
            raise ConfigError(
                f"every one of the {len(ds)} rows of dataset {source} has an empty or null "
                f"{' or '.join(self.format.columns)}. "
                "Fix: fill them in, or name the columns that hold the text (--data.prompt_column etc.)"
            )
        return kept, len(ds) - len(kept)

    def _tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self.tokenizer

    # ----------------------------------------------------------------- tokenizing and caching
    def check_max_length(self) -> None:
        """Fail before tokenizing when `max_length` cannot hold even the template (every row would be dropped)."""
        scaffold, what = self.format.scaffold(self._tokenizer())
        max_length = self.hparams.max_length
        if max_length <= scaffold:
            raise ConfigError(
                f"data.max_length={max_length} is no longer than {what}, which alone takes {scaffold} tokens, "
                f"so no prompt or response fits. Fix: raise --data.max_length well above {scaffold}"
            )

    def encode_input(self, text: str) -> list[int]:
        """The prompt ids generation starts from for a user's input: the training template, as training renders it."""
        return self.format.prompt_ids(self._tokenizer(), text)

    def prompt_format(self) -> dict[str, Any]:
        """How inputs were rendered in training, as saved beside an adapter."""
        return self.format.describe()

    def _cache_key(self) -> str:
        """Hash of the data's content (or Hub name), the tokenizer's vocabulary and every setting."""
        h = hashlib.sha256()
        for source in (self.hparams.dataset, self.hparams.val_dataset):
            path = local_file(source)
            if path is not None:
                with open(path, "rb") as f:  # in chunks: a data file may be larger than memory
                    h.update(hashlib.file_digest(f, "sha256").digest())
            else:
                h.update(str(source).encode())
        tok = self._tokenizer()
        h.update(
            tok.backend_tokenizer.to_str().encode() if tok.is_fast else str(sorted(tok.get_vocab().items())).encode()
        )
        h.update(str(tok.eos_token_id).encode())
        # Leading underscores are Lightning's bookkeeping (LightningCLI adds `_instantiator`), not settings:
        # without this, `prefetch` (which builds the datamodule directly) would key a cache `fit` never finds.
        settings = {
            k: v
            for k, v in self.hparams.items()
            if k not in ("batch_size", "batching", "num_workers", "num_proc", "cache_dir") and not k.startswith("_")
        }
        settings["template_text"] = TEMPLATES.get(self.hparams.template)
        settings["cache_format"] = CACHE_FORMAT
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return h.hexdigest()[:20]

    @property
    def cache_path(self) -> Path:
        return Path(self.hparams.cache_dir).expanduser() / "tokenized" / self._cache_key()

    def prepare_data(self) -> None:
        """Load, check and tokenize once (local rank 0), writing the cache atomically."""
        import datasets

        # Our own one-line report replaces datasets' per-file progress bars.
        datasets.disable_progress_bars()
        hp = self.hparams
        target = self.cache_path
        if (target / "stats.json").exists():
            return
        train = load_source(hp.dataset, hp.split)
        self._check(hp.dataset, train)
        train, empty = self._drop_blank(hp.dataset, train)
        skipped = {"train": empty, "val": 0}  # a held-out split comes from rows already kept
        if hp.max_samples is not None:
            train = train.shuffle(seed=hp.seed).select(range(min(hp.max_samples, len(train))))
        if hp.val_dataset is not None:
            val = load_source(hp.val_dataset, hp.val_split or hp.split)
            self._check(hp.val_dataset, val)
            val, skipped["val"] = self._drop_blank(hp.val_dataset, val)
            sources = {"train": (hp.dataset, train), "val": (hp.val_dataset, val)}
        else:
            if len(train) < 2:
                raise ConfigError(
                    f"dataset {hp.dataset} has {len(train)} row; a held-out split needs at least 2. "
                    "Fix: add rows or set --data.val_dataset"
                )
            parts = train.train_test_split(test_size=hp.val_fraction, seed=hp.seed)
            sources = {"train": (hp.dataset, parts["train"]), "val": (hp.dataset, parts["test"])}
        # Several nodes sharing the filesystem may write the same cache at once: the first one stands.
        with staged_directory(target, complete="stats.json") as tmp:
            stats = {}
            for name, (source, ds) in sources.items():
                scratch = tmp / f".{name}-tokenizing"  # inside the staged directory: removed with it on an error
                tokenized, stats[name] = tokenize_split(
                    source,
                    ds,
                    self.format,
                    self._tokenizer(),
                    hp.max_length,
                    hp.num_proc,
                    scratch,
                    fingerprint=f"{target.name}-{name}",
                )
                stats[name]["empty"] = skipped[name]
                # A copy into `save_to_disk`'s layout, which `setup` reads (`load_from_disk`) as it always has.
                tokenized.save_to_disk(str(tmp / name))
                del tokenized
                shutil.rmtree(scratch)
            (tmp / "stats.json").write_text(json.dumps(stats))

    def setup(self, stage: str | None = None) -> None:
        import datasets

        if self._splits:
            return
        target = self.cache_path
        if not (target / "stats.json").exists():
            raise RuntimeError(f"tokenized cache {target} is missing: prepare_data() must run before setup()")
        self.stats = json.loads((target / "stats.json").read_text())
        for name in ("train", "val"):
            self._splits[name] = datasets.load_from_disk(str(target / name)).with_format("python")
            s = self.stats[name]
            rank_zero_info(
                f"[data] {name}: {s['rows']} rows, {s['truncated']} truncated to max_length={self.hparams.max_length}, "
                f"{s['dropped']} dropped (no response token within max_length), "
                f"{s['empty']} skipped (an empty or null field)"
            )

    # ----------------------------------------------------------------- batching
    @property
    def pad_id(self) -> int:
        # Falcon has no pad token: pad with EOS. Padding is masked by attention_mask and labels,
        # never by token id, so the real EOS that ends each response stays a trained label.
        return special_ids(self._tokenizer())[1]

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest row (dynamic padding); `attention_mask` marks the real tokens.

        Packed rows also carry `position_ids`; their padding gets positions of its own from 0, so it is a
        segment of its own that no example attends to (`batching.segment_attention_mask`).
        """
        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)

        def padded(key: str, fill: int) -> torch.Tensor:
            # Padded as lists, then one tensor per field: a tensor per row and field costs far more.
            return torch.tensor([r[key] + [fill] * (width - n) for r, n in zip(rows, lengths)], dtype=torch.long)

        batch = {
            "input_ids": padded("input_ids", self.pad_id),
            "attention_mask": (torch.arange(width) < torch.tensor(lengths)[:, None]).long(),
            "labels": padded("labels", IGNORE_INDEX),
        }
        if "position_ids" in rows[0]:  # packed
            batch["position_ids"] = torch.tensor(
                [r["position_ids"] + list(range(width - n)) for r, n in zip(rows, lengths)], dtype=torch.long
            )
        return batch

    @staticmethod
    def collate_prompts(rows: list[dict]) -> dict[str, list]:
        """A generation batch: the inputs as text and their prompt ids (padded on the left when generating)."""
        return {"inputs": [r["input"] for r in rows], "prompt_ids": [r["prompt_ids"] for r in rows]}

    def _prediction_rows(self) -> list[dict]:
        if self.predict_inputs is not None:
            return [{"input": text, "prompt_ids": self.encode_input(text)} for text in self.predict_inputs]
        # the prompt part of each held-out row: everything before its first trained token
        return [
            {"input": r["input"], "prompt_ids": r["input_ids"][: prompt_length(r["labels"])]}
            for r in self._splits["val"]
        ]

    def _loader(self, rows: Any, collate, loader_class: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
        return loader_class(
            rows,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=collate,
            # Its own generator, even unshuffled: a loader without one draws its workers' seed from the global
            # generator on every pass, which would shift dropout after each validation (see sampler.py).
            generator=torch.Generator().manual_seed(self.hparams.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from (seed, epoch) and resumable mid-epoch (sampler.py); split across ranks."""
        hp, trainer, rows, lengths = self.hparams, self.trainer, self._splits["train"], None
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if hp.batching != "padded":
            lengths = [len(ids) for ids in rows["input_ids"]]
        if hp.batching == "packed":  # sequences of one or a few rows may still differ in length: grouped too
            rows = PackedRows(rows, hp.max_length, lengths)
            lengths = [sum(lengths[i] for i in b) for b in rows.bins]
            rank_zero_info(
                f"[data] packed {len(rows.rows)} train rows into {len(rows)} sequences of <= {hp.max_length}"
            )
        sampler = ResumableSampler(rows, world, rank, True, hp.seed, lengths=lengths, batch_size=hp.batch_size)
        return self._loader(rows, self.collate, ResumableLoader, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._splits["val"], self.collate)

    def test_dataloader(self) -> DataLoader:
        """The held-out split doubles as the test set (there is no separate test split)."""
        return self._loader(self._splits["val"], self.collate)

    def predict_dataloader(self) -> DataLoader:
        """`predict_inputs` (from the CLI's generation section), else the prompts of the held-out split."""
        return self._loader(self._prediction_rows(), self.collate_prompts)
