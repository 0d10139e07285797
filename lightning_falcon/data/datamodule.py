"""The LightningDataModule: load chat or prompt/response data, tokenize it once into an on-disk cache, batch it.

`prepare_data` (one process per node) loads, checks and tokenizes; `setup` (every rank) reads the
cache. Nothing heavy happens in the constructor, so `--print_config` and every rank stay cheap.

The data is one source or several (`data.dataset`, a list of `source.Source`), each with its own format,
held-out split and cache, all rendered through one chat template (`data.chat_template`); an epoch draws
from them by weight (`mixing.py`), and each source is validated on its own (`val_names`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader

from lightning_falcon.data.batching import Batching, PackedRows
from lightning_falcon.data.chat_templates import resolve_template, system_problems, template_problems
from lightning_falcon.data.conversations import Rendering, TrainOn, rendering_of
from lightning_falcon.data.formats import Chat, DataFormat, Preference, Turns, detect, expected_columns, row_columns
from lightning_falcon.data.inputs import read_inputs
from lightning_falcon.data.loading import empty, line_of, load_source, local_file, peek_columns
from lightning_falcon.data.mixing import Mix, quotas
from lightning_falcon.data.prompts import IGNORE_INDEX, prompt_length
from lightning_falcon.data.sampler import ResumableLoader, ResumableSampler
from lightning_falcon.data.source import Member, Source, members, setting
from lightning_falcon.data.tokenizer import load_tokenizer, special_ids
from lightning_falcon.data.tokenizing import screen_rows, tokenize_split
from lightning_falcon.errors import ConfigError
from lightning_falcon.files import staged_directory

# Part of the cache key: raise it when what a cache entry holds changes (2: the raw `input` text;
# 3: rows with an empty or null field are skipped and counted, not trained on as "None"; 4: one cache per source;
# 5: chat templates, and skips counted by reason).
CACHE_FORMAT = 5
# A preference pair's place among every pair of the run (each source's training pairs, then each one's held-out
# pairs: the order of `pair_parts`), by which a batch finds the reference's log-probabilities computed beforehand.
PAIR = "pair"


def _plain(source: Any) -> Any:
    """A `Source` as the mapping of its fields; anything else as it is."""
    return asdict(source) if isinstance(source, Source) else source


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        # `dict` before `Source`: jsonargparse keeps a mapping as written (a `--data.dataset.KEY` merges into it),
        # so `members` checks it and names a bad field by its option; `Source` documents the fields in `--help`.
        dataset: str | dict | Source | list[str | dict | Source] | None = None,
        chat_template: str = "auto",
        system_prompt: str | None = None,
        train_on: TrainOn = "all_assistant",
        tokenizer: str | None = None,
        max_length: int = 512,
        max_samples: int | None = None,
        batch_size: int = 4,
        batching: Batching = "padded",
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
        cache_dir: str = "~/.cache/lightning_falcon",
        predict_inputs: str | list[str] | None = None,
    ) -> None:
        """Chat and prompt/response data for causal-LM fine-tuning: one source, or several mixed by weight.

        Args:
            dataset: The training data, a list of sources. One source may stand alone: a local
                .jsonl/.json/.csv/.parquet file, a Hub dataset name or `asset:NAME` (shipped data, e.g.
                `asset:data/midjourney.jsonl`) with every default; or a mapping of a source's settings
                (`dataset`, `format`, `val_fraction`, ...: `fit --data.dataset.help Source` lists them,
                lightning_falcon/data/source.py). Its `format` is `auto` by default: `messages` (or ShareGPT)
                lists, alpaca rows, prompt/response pairs or guanaco-style turns, read from the columns.
                Several are mixed: each epoch holds as many rows as they have together, each source's share
                following its `weight`, drawn without replacement from (seed, epoch)
                (lightning_falcon/data/mixing.py), and each is validated on its own (`val/loss/<name>`).
                Generation, chat and export render a request as the first source does.
            chat_template: How conversations are rendered (every format but `turns`), training and generation
                alike, and what the adapter and exports carry: `auto` (the tokenizer's own template where it has
                one, else its model family's: `instruction` for Falcon, `falcon3`, `falcon-h1`), `tokenizer` (its
                own, which must exist), a name (`falcon-instruct`, `falcon-180b-chat`, `falcon3`, `falcon-h1`,
                `chatml`, `instruction`, `guanaco`, `plain`; lightning_falcon/data/chat_templates.py) or a `.jinja`
                file.
            system_prompt: The system message of a conversation without one of its own, in training and at
                generation; None: none.
            train_on: Which assistant replies of a conversation train: `all_assistant` or `last_assistant`
                (the earlier ones are context).
            tokenizer: Tokenizer name or directory; defaults to `model.model_name_or_path`.
            max_length: Sequences are cut to this many tokens; the number of cut rows is reported.
            max_samples: Use at most this many rows of each source (for quick runs); None uses all.
            batch_size: Sequences per batch on each device (packed sequences with `batching: packed`).
            batching: How training rows form batches. `padded`: random order, each batch padded to its
                longest row. `grouped`: rows of similar length batched together (less padding, still
                `batch_size` rows per step). `packed`: whole rows packed into sequences of up to `max_length`
                tokens that do not attend to each other (more rows per step), batched by length like
                `grouped`; a sequence holds rows of one source. Validation stays `padded`.
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize in `prepare_data`. None: one per `ROWS_PER_PROCESS` rows of a split
                (lightning_falcon/data/tokenizing.py), at most one per CPU this process may run on.
            seed: Seed of the held-out split, of the mix and of shuffling.
            cache_dir: Where tokenized data is cached, one entry per source, keyed on its data, the tokenizer
                and the settings its rows depend on.
            predict_inputs: `predict`'s inputs: a file (JSONL with an `input` or prompt field per line, or plain
                text, one per line) or the texts themselves; None generates for the held-out prompts. The CLI
                passes its `generation.input_file` or `generation.inputs`.
        """
        # plain mappings in the saved hyperparameters, so checkpoints load weights-only
        dataset = [_plain(s) for s in dataset] if isinstance(dataset, list) else _plain(dataset)
        super().__init__()
        self.save_hyperparameters()
        self.members, problems = members(dataset)
        if max_length < 2:
            problems.append(f"data.max_length must be at least 2, got {max_length}. Fix: --data.max_length 512")
        if batch_size < 1:
            problems.append(f"data.batch_size must be at least 1, got {batch_size}. Fix: --data.batch_size 4")
        if num_proc is not None and num_proc < 1:
            problems.append(
                f"data.num_proc must be at least 1, got {num_proc}. Fix: --data.num_proc 2, or leave it unset"
            )
        ConfigError.collect(problems)
        self._tokenizer = None  # loaded when first asked for (`tokenizer`)
        self._rendering: Rendering | None = None  # the chat template, resolved with the tokenizer (`rendering`)
        self._kinds: dict[str, tuple[str, tuple[str, ...]]] = {}  # source name -> (its format, its columns)
        # totals over the sources (`train`, `val`), and each source's own (`sources[name][split]`)
        self.stats: dict[str, Any] = {}
        self._splits: dict[str, Any] = {}  # `train` and `val`: every source's rows, end to end
        self._parts: dict[str, list[Any]] = {}  # `train` and `val`: each source's rows, in the order of `members`
        self._predict_texts: list[str] | None = None  # `predict_inputs`, read by `predict_texts`
        # (pairs, 2): the reference's log-probabilities of each pair's chosen and rejected sequences, by `PAIR`, when
        # computed before training (`with_reference`)
        self._reference: torch.Tensor | None = None

    @property
    def format(self) -> DataFormat:
        """How generation, chat and export render a request: as the first source's rows were."""
        return self.format_of(self.members[0])

    @property
    def rendering(self) -> Rendering:
        """`data.chat_template` for this tokenizer, what ends a reply, and which replies train."""
        if self._rendering is None:
            tok, hp = self.tokenizer, self.hparams
            template = resolve_template(hp.chat_template, tok)
            # a template that cannot render an exchange fails here, in one line, not in the middle of tokenizing
            ConfigError.collect(template_problems(tok, template))
            self._rendering = rendering_of(tok, template, hp.train_on)
        return self._rendering

    def format_of(self, member: Member, columns: list[str] | None = None, dataset: str | None = None) -> DataFormat:
        """A source's format: as set, or for `auto` the one its columns fit.

        Args:
            member: The source.
            columns: The columns of its loaded `dataset` (None: its training data's first rows are read).
            dataset: Which of its files `columns` are of; its `val_dataset` must have the format of its `dataset`,
                and the columns it reads are its own.
        """
        source = member.source
        own = dataset is None or dataset == source.dataset
        if member.name not in self._kinds or columns is not None:
            if columns is None:
                name = member.name if member.mixed else None
                columns = (
                    peek_columns(source.dataset, source.split, name, member.option) if source.format == "auto" else []
                )
            kind = source.format if source.format != "auto" else detect(columns, source)
            if kind is None:
                raise ConfigError(
                    f"dataset {member.label(dataset)} has none of the columns of a format: it has {columns}. Fix: "
                    f"give it the columns of one of {expected_columns(source)}, or name yours "
                    f"({setting(member.option, 'prompt_column')} etc.)"
                )
            cols = row_columns(kind, source, columns or None)
            if not own:
                trained = self._kinds[member.name][0] if member.name in self._kinds else kind
                if kind != trained:
                    raise ConfigError(
                        f"dataset {member.label(dataset)} holds {kind} rows and {member.label()} {trained} rows. "
                        f"Fix: give {setting(member.option, 'val_dataset')} rows of the same format"
                    )
                return self._format(member, kind, cols)
            if source.format == "auto" and self._kinds.get(member.name) != (kind, cols):
                rank_zero_info(
                    f"[data] {member.name}: format {kind}, from its column(s) {', '.join(cols)} "
                    f"(set {setting(member.option, 'format')} to choose)"
                )
            self._kinds[member.name] = (kind, cols)
        return self._format(member, *self._kinds[member.name])

    def _format(self, member: Member, kind: str, columns: tuple[str, ...]) -> DataFormat:
        source = member.source
        if kind == "turns":
            return Turns(source.text_column, source.human_marker, source.assistant_marker)
        if kind == "preference":  # only the answer trains: the request is the same on both sides
            rendering = dataclasses.replace(self.rendering, train_on="last_assistant")
            return Preference(kind, columns, rendering, self.hparams.system_prompt)
        return Chat(kind, columns, self.rendering, self.hparams.system_prompt)

    @property
    def val_names(self) -> list[str]:
        """The source each validation dataloader holds, in order (one loader per source)."""
        return [m.name for m in self.members]

    # ----------------------------------------------------------------- loading and checking
    def _check(self, member: Member, dataset: str, ds) -> DataFormat:
        """The source's format, for the columns of its loaded rows; a one-line error when they lack its columns
        or hold no row."""
        option = member.option
        fmt = self.format_of(member, ds.column_names, dataset)
        missing = [c for c in fmt.columns if c not in ds.column_names]
        if missing:
            raise ConfigError(
                f"dataset {member.label(dataset)} lacks column(s) {missing}; it has {ds.column_names}. "
                f"Fix: name the columns that hold the text ({setting(option, 'prompt_column')} etc.), or set "
                f"{setting(option, 'format')} to the format it has: one of {expected_columns(member.source)}"
            )
        if len(ds) == 0:
            raise empty(member.label(dataset), option, "dataset" if dataset == member.source.dataset else "val_dataset")
        return fmt

    def _screen(self, member: Member, dataset: str, ds, fmt: DataFormat) -> tuple[Any, dict[str, int], DataFormat]:
        """Skip the rows that cannot train, counted by reason; fail when none is left, or when rows have a system
        message the chat template cannot render."""
        kept, skipped, first, systems = screen_rows(ds, fmt, self.hparams.num_proc)
        if len(kept) == 0:
            index, reason = first
            counts = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
            raise ConfigError(
                f"no row of dataset {member.label(dataset)} can train ({counts}); the first, "
                f"{line_of(dataset, index)}, has {reason}. Fix: give each row a user turn and an assistant reply "
                f"with text (or name the columns that hold them, {setting(member.option, 'format')} etc.)"
            )
        if isinstance(fmt, Chat) and (systems or self.hparams.system_prompt):
            ConfigError.collect(system_problems(self.tokenizer, self.rendering.template))
        return kept, skipped, fmt

    def _load(self, member: Member, dataset: str, split: str):
        """One file or Hub split of a source, checked, with the rows that cannot train skipped:
        (rows, skipped rows by reason, the format of its rows)."""
        key = "dataset" if dataset == member.source.dataset else "val_dataset"
        ds = load_source(dataset, split, member.name if member.mixed else None, member.option, key)
        return self._screen(member, dataset, ds, self._check(member, dataset, ds))

    @property
    def tokenizer(self):
        """`data.tokenizer`, loaded on first use in each process (every rank that asks has its own)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    # ----------------------------------------------------------------- tokenizing and caching
    def check_rendering(self) -> None:
        """Fail before tokenizing, listing each problem: a chat template that cannot render the run's
        conversations (or `data.system_prompt`), or a `max_length` that cannot hold even a source's rendering of an
        empty request (every row would be dropped)."""
        hp = self.hparams
        # a template that cannot be found or render an exchange raises here (`rendering`): nothing below can be
        # checked without it
        if any(isinstance(self.format_of(m), Chat) for m in self.members) and hp.system_prompt:
            ConfigError.collect(system_problems(self.tokenizer, self.rendering.template))
        problems = []
        for member in self.members:
            scaffold, what = self.format_of(member).scaffold(self.tokenizer)
            if hp.max_length <= scaffold:
                of = f" (source {member.name!r})" if member.mixed else ""
                problems.append(
                    f"data.max_length={hp.max_length} is no longer than {what}{of}, which alone takes {scaffold} "
                    f"tokens, so no request or reply fits. Fix: raise --data.max_length well above {scaffold}"
                )
        ConfigError.collect(problems)

    def check_objective(self, objective: str, paired: bool) -> None:
        """Fail when the sources' rows do not fit `model.objective` (`paired`: it trains on preference pairs)."""
        kinds = {m.name: getattr(self.format_of(m), "kind", "turns") for m in self.members}
        wrong = sorted(name for name, kind in kinds.items() if (kind == "preference") != paired)
        problems = []
        if wrong and paired:
            problems.append(
                f"model.objective {objective} trains on preference pairs, but data source(s) {wrong} hold "
                f"{sorted({kinds[n] for n in wrong})} rows. Fix: give rows with prompt, chosen and rejected columns "
                "(and set data.dataset.format preference where they also hold messages), or --model.objective sft"
            )
        elif wrong:
            problems.append(
                f"data source(s) {wrong} hold preference pairs (chosen and rejected answers), which model.objective "
                f"{objective} does not train on. Fix: --model.objective dpo (or ipo, orpo)"
            )
        ConfigError.collect(problems)

    def encode_input(self, text: str) -> list[int]:
        """The prompt ids generation starts from for a user's input: the training template, as training renders it."""
        return self.format.prompt_ids(self.tokenizer, text)

    @property
    def reply_marker(self) -> str:
        """Text a generated reply ends with before its EOS that is not part of the answer (ChatML's `<|im_end|>` on
        a tokenizer without it as a token); empty for most templates."""
        return self.format.reply_marker

    def prompt_format(self) -> dict[str, Any]:
        """How inputs were rendered in training, as saved beside an adapter."""
        return self.format.describe()

    def _cache_key(self, member: Member) -> str:
        """Hash of a source's data (its content, or its Hub name), the tokenizer and every setting its rows
        depend on."""
        h = hashlib.sha256()
        for dataset in (member.source.dataset, member.source.val_dataset):
            path = local_file(dataset)
            if path is not None:
                with open(path, "rb") as f:  # in chunks: a data file may be larger than memory
                    h.update(hashlib.file_digest(f, "sha256").digest())
            else:
                h.update(str(dataset).encode())
        tok = self.tokenizer
        h.update(
            tok.backend_tokenizer.to_str().encode() if tok.is_fast else str(sorted(tok.get_vocab().items())).encode()
        )
        h.update(str(tok.eos_token_id).encode())
        hp = self.hparams
        settings = {
            **member.settings(),
            "max_length": hp.max_length,
            "max_samples": hp.max_samples,
            "seed": hp.seed,
            "cache_format": CACHE_FORMAT,
        }
        fmt = self.format_of(member)
        if isinstance(fmt, Chat):  # how its conversations render
            settings.update(describe=fmt.describe(), eos=self.rendering.eos)
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return h.hexdigest()[:20]

    @property
    def cache_paths(self) -> dict[str, Path]:
        """Each source's tokenized cache (its `train` and `val` splits and `stats.json`), by name."""
        root = Path(self.hparams.cache_dir).expanduser() / "tokenized"
        return {m.name: root / self._cache_key(m) for m in self.members}

    def prepare_data(self) -> None:
        """Load, check and tokenize each source whose cache is missing (local rank 0), writing its cache atomically."""
        import datasets

        # Our own one-line report replaces datasets' per-file progress bars.
        datasets.disable_progress_bars()
        for member, target in zip(self.members, self.cache_paths.values(), strict=True):
            if not (target / "stats.json").exists():
                self._prepare(member, target)

    def _prepare(self, member: Member, target: Path) -> None:
        hp, source = self.hparams, member.source
        train, train_skips, fmt = self._load(member, source.dataset, source.split)
        skips = {"train": train_skips, "val": {}}  # a held-out split comes from rows already kept
        formats = {"train": fmt, "val": fmt}
        if hp.max_samples is not None:
            train = train.shuffle(seed=hp.seed).select(range(min(hp.max_samples, len(train))))
        if source.val_dataset is not None:
            val, skips["val"], formats["val"] = self._load(member, source.val_dataset, source.val_split or source.split)
            splits = {"train": (source.dataset, train), "val": (source.val_dataset, val)}
        else:
            held_out = math.ceil(len(train) * source.val_fraction)  # as `train_test_split` counts them
            if len(train) < 2 or held_out >= len(train):
                raise ConfigError(
                    f"dataset {member.label()} has {len(train)} row(s); holding out val_fraction="
                    f"{source.val_fraction} of them leaves {max(len(train) - held_out, 0)} to train on. "
                    f"Fix: add rows, lower {setting(member.option, 'val_fraction')} or set "
                    f"{setting(member.option, 'val_dataset')}"
                )
            parts = train.train_test_split(test_size=source.val_fraction, seed=hp.seed)
            splits = {"train": (source.dataset, parts["train"]), "val": (source.dataset, parts["test"])}
        # Several nodes sharing the filesystem may write the same cache at once: the first one stands.
        with staged_directory(target, complete="stats.json") as tmp:
            stats = {}
            for name, (dataset, ds) in splits.items():
                scratch = tmp / f".{name}-tokenizing"  # inside the staged directory: removed with it on an error
                tokenized, stats[name] = tokenize_split(
                    member.label(dataset),
                    ds,
                    formats[name],
                    self.tokenizer,
                    hp.max_length,
                    hp.num_proc,
                    scratch,
                    fingerprint=f"{target.name}-{name}",
                )
                stats[name]["skipped"] = skips[name]
                # A copy into `save_to_disk`'s layout, which `setup` reads (`load_from_disk`) as it always has.
                tokenized.save_to_disk(str(tmp / name))
                del tokenized
                shutil.rmtree(scratch)
            (tmp / "stats.json").write_text(json.dumps(stats))

    def setup(self, stage: str | None = None) -> None:
        import datasets

        if self._splits:
            return
        parts: dict[str, list] = {"train": [], "val": []}
        self.stats = {"train": {}, "val": {}, "sources": {}}
        for member, target in zip(self.members, self.cache_paths.values(), strict=True):
            if not (target / "stats.json").exists():
                raise RuntimeError(f"tokenized cache {target} is missing: prepare_data() must run before setup()")
            self.stats["sources"][member.name] = json.loads((target / "stats.json").read_text())
            for name in ("train", "val"):
                parts[name].append(datasets.load_from_disk(str(target / name)).with_format("python"))
                for key, value in self.stats["sources"][member.name][name].items():
                    if key == "skipped":  # by reason
                        total = self.stats[name].setdefault(key, {})
                        for reason, n in value.items():
                            total[reason] = total.get(reason, 0) + n
                    else:
                        self.stats[name][key] = self.stats[name].get(key, 0) + value
        offset = 0
        for name in ("train", "val"):  # number the pairs, for `with_reference`
            for i, part in enumerate(parts[name]):
                if "rejected_ids" in part.column_names:
                    parts[name][i] = part.add_column(PAIR, list(range(offset, offset + len(part))))
                    offset += len(part)
        self._parts = parts
        for name, rows in parts.items():
            self._splits[name] = rows[0] if len(rows) == 1 else datasets.concatenate_datasets(rows)
        self._report()

    def _report(self) -> None:
        """A `[data]` line for each split of each source: rows, and every cut, drop and skip."""
        for member in self.members:
            for name in ("train", "val"):
                s = self.stats["sources"][member.name][name]
                of = f" {member.name}" if member.mixed else ""
                reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(s["skipped"].items()))
                turns = (
                    f", {s['turns_dropped']} earlier exchanges left out of {s['rows_short']} rows to fit"
                    if s["turns_dropped"]
                    else ""
                )
                rank_zero_info(
                    f"[data] {name}{of}: {s['rows']} rows, {s['truncated']} truncated to "
                    f"max_length={self.hparams.max_length}{turns}, {s['dropped']} dropped (no reply token within "
                    f"max_length), {sum(s['skipped'].values())} skipped" + (f" ({reasons})" if reasons else "")
                )

    # ----------------------------------------------------------------- batching
    @property
    def pad_id(self) -> int:
        # Falcon has no pad token: pad with EOS. Padding is masked by attention_mask and labels,
        # never by token id, so the real EOS that ends each response stays a trained label.
        return special_ids(self.tokenizer)[1]

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest row (dynamic padding); `attention_mask` marks the real tokens.

        Packed rows also carry `position_ids`; their padding gets positions of its own from 0, so it is a
        segment of its own that no example attends to (`batching.segment_attention_mask`). Preference pairs become
        twice as many sequences, every chosen one first, then the rejected ones in the same order, with the
        reference's log-probabilities of each when they were computed beforehand (`with_reference`).
        """
        if "rejected_ids" not in rows[0]:
            return self._padded(rows)
        rejected = [{"input_ids": r["rejected_ids"], "labels": r["rejected_labels"]} for r in rows]
        batch = self._padded(rows + rejected)
        if self._reference is not None:
            chosen_and_rejected = self._reference[[r[PAIR] for r in rows]]
            batch["reference_logps"] = chosen_and_rejected.T.reshape(-1)  # every chosen one, then every rejected
        return batch

    def _padded(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)

        def padded(key: str, fill: int) -> torch.Tensor:
            # Padded as lists, then one tensor per field: a tensor per row and field costs far more.
            return torch.tensor(
                [r[key] + [fill] * (width - n) for r, n in zip(rows, lengths, strict=True)], dtype=torch.long
            )

        batch = {
            "input_ids": padded("input_ids", self.pad_id),
            "attention_mask": (torch.arange(width) < torch.tensor(lengths)[:, None]).long(),
            "labels": padded("labels", IGNORE_INDEX),
        }
        if "position_ids" in rows[0]:  # packed
            batch["position_ids"] = torch.tensor(
                [r["position_ids"] + list(range(width - n)) for r, n in zip(rows, lengths, strict=True)],
                dtype=torch.long,
            )
        return batch

    @staticmethod
    def collate_prompts(rows: list[dict]) -> dict[str, list]:
        """A generation batch: the inputs as text and their prompt ids (padded on the left when generating)."""
        return {"inputs": [r["input"] for r in rows], "prompt_ids": [r["prompt_ids"] for r in rows]}

    def predict_texts(self) -> list[str] | None:
        """`predict_inputs` as texts, the file read once (an empty or unreadable one fails here, before any
        weights load when the CLI asks first); None: predict the held-out prompts."""
        inputs = self.hparams.predict_inputs
        if self._predict_texts is None and inputs is not None:
            prompt_field = self.members[0].source.prompt_column
            self._predict_texts = read_inputs(inputs, prompt_field) if isinstance(inputs, str) else list(inputs)
        return self._predict_texts

    def _prediction_rows(self) -> list[dict]:
        texts = self.predict_texts()
        if texts is not None:
            return [{"input": text, "prompt_ids": self.encode_input(text)} for text in texts]
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

    def _mixed_rows(self) -> tuple[Any, list[int] | None, Mix]:
        """The training items end to end (rows, or packed sequences of one source's rows), their lengths
        (None for `padded`), and the mix that draws each epoch's items from them."""
        hp, parts = self.hparams, self._parts["train"]
        rows = [len(part) for part in parts]
        lengths = [_lengths(part) for part in parts] if hp.batching != "padded" else None
        items: Any = self._splits["train"]
        if hp.batching == "packed":  # sequences of one or a few rows may still differ in length: grouped too
            packed = [PackedRows(part, hp.max_length, n) for part, n in zip(parts, lengths, strict=True)]
            lengths = [[sum(n[i] for i in b) for b in p.bins] for p, n in zip(packed, lengths, strict=True)]
            items = packed[0] if len(packed) == 1 else ConcatDataset(packed)
            rank_zero_info(f"[data] packed {sum(rows)} train rows into {len(items)} sequences of <= {hp.max_length}")
        counts = [len(n) for n in lengths] if hp.batching == "packed" else rows
        weights = [m.source.weight for m in self.members]
        mix = Mix(tuple(counts), tuple(quotas(weights, counts, rows)), hp.seed)
        if len(self.members) > 1:
            self._report_mix(mix, rows)
        return items, None if lengths is None else [n for part in lengths for n in part], mix

    def _report_mix(self, mix: Mix, rows: list[int]) -> None:
        """A `[data]` line for each source: its share of an epoch's rows, and how often each of its rows comes."""
        epoch_rows = [quota * n / items for quota, n, items in zip(mix.quotas, rows, mix.items, strict=True)]
        about = "about " if self.hparams.batching == "packed" else ""  # whole sequences are drawn, not rows
        for member, share, n, quota in zip(self.members, epoch_rows, rows, mix.quotas, strict=True):
            if quota == 0:
                rank_zero_warn(
                    f"[data] source {member.name!r} gets no row of an epoch at weight {member.source.weight:g}: "
                    "it does not train. Fix: raise its weight"
                )
            rank_zero_info(
                f"[data] mix {member.name}: weight {member.source.weight:g}, {share / sum(epoch_rows):.1%} of an "
                f"epoch's rows ({about}{share:.0f} of {sum(epoch_rows):.0f}), each of its {n} rows "
                f"{share / n:.2f} times an epoch"
            )

    def pair_parts(self) -> list[Any]:
        """Each source's training pairs, then each one's held-out pairs: every pair of the run, in `PAIR` order."""
        return [part for split in ("train", "val") for part in self._parts[split] if PAIR in part.column_names]

    def with_reference(self, values: torch.Tensor | None) -> None:
        """From now on every batch of pairs carries the reference's log-probabilities of its sequences: `values`,
        (pairs, 2), holds each pair's chosen and rejected ones in `pair_parts` order; None: no batch carries any.
        Loaders made before read them too: `collate` looks them up."""
        if values is None:
            self._reference = None
            return
        pairs = sum(len(part) for part in self.pair_parts())
        if tuple(values.shape) != (pairs, 2):
            raise ValueError(f"reference log-probabilities of shape {tuple(values.shape)} for {pairs} pairs")
        self._reference = values.float()

    def train_dataloader(self) -> DataLoader:
        """Drawn and shuffled per epoch from (seed, epoch) and resumable mid-epoch (sampler.py); split across ranks."""
        hp, trainer = self.hparams, self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        items, lengths, mix = self._mixed_rows()
        sampler = ResumableSampler(
            items, world, rank, True, hp.seed, lengths=lengths, batch_size=hp.batch_size, mix=mix
        )
        return self._loader(items, self.collate, ResumableLoader, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The held-out rows; one loader per source when there are several (`val_names`), so each has its loss."""
        loaders = [self._loader(part, self.collate) for part in self._parts["val"]]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader:
        """The held-out rows of every source, together, double as the test set (there is no separate test split)."""
        return self._loader(self._splits["val"], self.collate)

    def predict_dataloader(self) -> DataLoader:
        """`predict_inputs`, else the prompts of the held-out split."""
        return self._loader(self._prediction_rows(), self.collate_prompts)


def _lengths(rows: Any) -> list[int]:
    """Each row's length; a preference pair's is its longer sequence's, which its batch is padded to."""
    lengths = [len(ids) for ids in rows["input_ids"]]
    if "rejected_ids" in rows.column_names:
        lengths = [max(n, len(ids)) for n, ids in zip(lengths, rows["rejected_ids"], strict=True)]
    return lengths
