"""The LightningModule: a quantized Falcon with LoRA adapters, one shared step, optimizers and slim checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import MeanMetric

from lightning_falcon.architectures import Architecture, architecture
from lightning_falcon.assets import resolve
from lightning_falcon.data.batching import packed_attention_mask
from lightning_falcon.data.prompts import IGNORE_INDEX
from lightning_falcon.errors import ConfigError
from lightning_falcon.files import load_weights_only
from lightning_falcon.model.adapter import check_matches, load_weights
from lightning_falcon.model.attention import attend, default_implementation
from lightning_falcon.model.config import read_model_config
from lightning_falcon.model.generation import Generated, GenerationSettings, generate
from lightning_falcon.model.lora import (
    REFERENCE,
    active_adapter,
    add_reference,
    apply_lora,
    check_target_modules,
    linear_module_names,
    parameter_report,
)
from lightning_falcon.model.loss import chunked_causal_lm_loss, output_layer
from lightning_falcon.model.placement import base_placement, zero_stage
from lightning_falcon.model.preference import (
    METRICS,
    PAIRED,
    REFERENCED,
    Objective,
    PairLoss,
    pair_loss,
    sequence_logps,
)
from lightning_falcon.model.quantization import (
    ComputeDtype,
    Quantization,
    load_causal_lm,
    quantized_layers,
    resolve_compute_dtype,
)
from lightning_falcon.model.random_weights import random_checkpoint
from lightning_falcon.model.step_policy import (
    NonFiniteLoss,
    Optimizer,
    Schedule,
    StepGuard,
    clips_by_norm_itself,
    fused_adamw_fits,
    lr_factor,
    lr_scheduler,
    optimizer,
)
from lightning_falcon.upstream import attn_implementation, log_to_loggers, logging_step, route_falcon_attention


class FalconQLoRA(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        random_init: bool = False,
        trust_remote_code: bool = False,
        quantization: Quantization = "nf4",
        double_quant: bool = True,
        compute_dtype: ComputeDtype = "auto",
        attn_implementation: str | None = None,
        fused_attention: bool = True,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        upcast_frozen: bool = True,
        loss_chunk_size: int | None = 256,
        optimizer: Optimizer = "adamw",
        fused_adamw: bool = True,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.0,
        random_init_dir: str = "~/.cache/lightning_falcon/random",
        adapter: str | None = None,
        objective: Objective = "sft",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        precompute_reference: bool = False,
        generation: GenerationSettings | None = None,
    ) -> None:
        """QLoRA fine-tuning of a causal LM of a supported family (`lightning_falcon/architectures.py`).

        Args:
            model_name_or_path: Hub id (`tiiuae/falcon-7b-instruct`) or local directory, loaded with `from_pretrained`.
                `asset:NAME` names a model shipped with the package (e.g. `asset:tiny-falcon`).
            random_init: Build the same architecture from its config.json with random weights instead of
                downloading them (dry runs, benchmarks). The weights still go through the real quantized loader.
            trust_remote_code: Allow custom modelling code from the Hub. Off: every supported family is native in
                transformers.
            quantization: Base weights as bitsandbytes `nf4` or `fp4` (4-bit), `int8`, or `none` (plain LoRA).
            double_quant: Quantize the 4-bit quantization constants too (saves ~0.4 bit per weight).
            compute_dtype: Dtype of matmuls and unquantized weights. `auto`: bf16 on a GPU with native bf16
                (compute capability 8.0 or later: A100, H100, L4, RTX 30xx), fp16 on older ones (T4, V100), fp32 on
                CPU. bf16 on a GPU without native bf16 is refused before loading.
            attn_implementation: transformers attention backend (`sdpa`, `eager`, `flash_attention_2`). None:
                `flash_attention_2` on a CUDA GPU of compute capability 8.0 or later where flash-attn is installed
                (the `flash` extra) and the compute dtype is 16-bit, so that packed batches need no mask; else `sdpa`.
            fused_attention: With `sdpa`, Falcon's keys and values stay at their own head count (one for Falcon-7B,
                8 groups for 40B, 180B and Falcon2-11B) and reach SDPA's fused kernels (`model/attention.py`). False:
                transformers' own Falcon attention, which on Falcon-7B runs SDPA's math kernel (the whole score
                matrix, in fp32) and copies 40B's keys and values to every query head. Falcon3 and Falcon-H1 always
                run transformers' own attention.
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
            lora_dropout: Dropout on the LoRA input.
            target_modules: Linear layers that get adapters; None = every projection LoRA reaches in the model's
                family (`lightning_falcon/architectures.py`): Falcon's query_key_value, dense, dense_h_to_4h and
                dense_4h_to_h; Falcon3's q/k/v/o and gate/up/down projections; Falcon-H1's those and Mamba's in_proj.
            gradient_checkpointing: Recompute activations in backward to save memory (KV cache stays off).
            upcast_frozen: Upcast the frozen unquantized weights (embeddings, norms, biases) to fp32, as PEFT's
                `prepare_model_for_kbit_training` does for stability. False keeps them in the compute dtype: at
                Falcon-7B with bf16, 0.55 GiB less. No difference where the compute dtype is fp32 (CPU).
            loss_chunk_size: The training and validation loss runs the output layer this many positions at a time,
                so the whole vocabulary's logits never exist at once (`model/loss.py`); the same loss. None: the
                model's own loss over the batch's full logits.
            optimizer: `adamw` (torch) or `paged_adamw_8bit` (bitsandbytes' 8-bit AdamW: 2 bytes of state per LoRA
                weight, not 8; its states page to host memory under GPU memory pressure, and on CPU it runs unpaged).
            fused_adamw: `adamw` as torch's fused kernel (CPU or CUDA): one kernel for all LoRA tensors, the
                same update. False: torch's default (a loop over tensors on CPU, `foreach` on CUDA).
            learning_rate: Peak learning rate, reached after warmup.
            weight_decay: Decoupled weight decay on the LoRA weights.
            betas: Adam betas.
            warmup_steps: Optimizer steps of linear warmup from 0.
            lr_schedule: After warmup, `cosine` decay to `min_lr_ratio` * lr over the run, or `constant`.
            min_lr_ratio: Floor of the cosine schedule as a fraction of the peak.
            random_init_dir: Where `random_init` checkpoints are written (once per architecture).
            adapter: LoRA weights to start from: an adapter directory or a `.ckpt` of this model's LoRA weights,
                loaded right after LoRA is added. `fit` trains on from them (a new run: no optimizer or loop state,
                which `--ckpt_path` resumes); the CLI's other subcommands take `--ckpt_path` here. In fit with
                `dpo` or `ipo` it is also the reference, kept frozen beside the trained copy; without it (and in the
                other subcommands) the reference is the base (the adapter switched off). No second copy of the
                base either way.
            objective: What fit trains for. `sft`: the next-token loss of the replies. `dpo`: prefer each pair's
                chosen answer over its rejected one, against the reference (sigmoid loss; conservative DPO with
                `label_smoothing`). `ipo`: the same with IPO's squared loss of per-token log-ratios. `orpo`: the
                chosen answer's NLL plus an odds-ratio term, with no reference. The preference objectives need
                preference data (`prompt`, `chosen`, `rejected` columns; lightning_falcon/model/preference.py).
            beta: DPO's and IPO's strength of the pull towards the reference (higher: stay closer); ORPO's weight of
                the odds-ratio term.
            label_smoothing: `dpo` only: the assumed share of pairs whose preference is flipped (conservative DPO),
                in [0, 0.5).
            precompute_reference: `dpo` and `ipo`: compute the reference's log-probabilities of every pair once,
                before the first step, and cache them beside the tokenized data (keyed like it, and by the base and
                adapter), so that training runs no reference forward (lightning_falcon/training/reference.py).
            generation: How `generate` and `predict` decode. The CLI passes its `generation:` section.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["generation"])  # a run-time setting, not a hyperparameter
        problems = []
        if lora_r < 1:
            problems.append(f"model.lora_r must be >= 1, got {lora_r}. Fix: --model.lora_r 8 (or 16, 64)")
        if not 0.0 <= lora_dropout < 1.0:
            problems.append(f"model.lora_dropout must be in [0, 1), got {lora_dropout}. Fix: --model.lora_dropout 0.05")
        if target_modules is not None and not target_modules:
            problems.append("model.target_modules is empty; LoRA needs at least one module. Fix: leave it unset (null)")
        if learning_rate <= 0:
            problems.append(f"model.learning_rate must be > 0, got {learning_rate}. Fix: --model.learning_rate 2e-4")
        if warmup_steps < 0:
            problems.append(f"model.warmup_steps must be >= 0, got {warmup_steps}. Fix: --model.warmup_steps 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            problems.append(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}. Fix: --model.min_lr_ratio 0.0")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            problems.append(
                f"model.loss_chunk_size must be >= 1 or null, got {loss_chunk_size}. Fix: --model.loss_chunk_size 256"
            )
        if beta <= 0:
            problems.append(f"model.beta must be > 0, got {beta}. Fix: --model.beta 0.1")
        if not 0.0 <= label_smoothing < 0.5:
            problems.append(
                f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}. Fix: --model.label_smoothing 0.0"
            )
        elif label_smoothing and objective != "dpo":
            problems.append(
                f"model.label_smoothing={label_smoothing} applies to objective dpo only, not {objective}. "
                "Fix: --model.label_smoothing 0.0, or --model.objective dpo"
            )
        if objective not in get_args(Objective):
            problems.append(f"model.objective must be one of {list(get_args(Objective))}, got {objective!r}. Fix: sft")
        if precompute_reference and objective not in REFERENCED:
            problems.append(
                f"model.precompute_reference: objective {objective} has no reference model. "
                "Fix: --model.precompute_reference false, or --model.objective dpo"
            )
        ConfigError.collect(problems)
        self.model: torch.nn.Module | None = None
        self.generation = generation or GenerationSettings()
        self.tokenizer = None  # the data module's, for generation: from `setup`
        self.reply_marker = ""  # what ends a generated reply before its EOS, not part of it: from `setup`
        self._adapter_enabled = True  # off inside `base_only`
        # Checkpoints hold only trainable weights, so the frozen base is absent on load by design.
        self.strict_loading = False
        self.eval_loss = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        # a preference objective's metrics over an evaluation epoch, by stage and `METRICS` index
        self.eval_pairs = torch.nn.ModuleDict(
            {stage: torch.nn.ModuleList(MeanMetric() for _ in METRICS) for stage in ("val", "test")}
            if objective in PAIRED
            else {}
        )
        # With several data sources, each validation dataloader's own loss (`setup`), logged as val/loss/<name>.
        self.source_names: list[str] = []
        self.source_loss = torch.nn.ModuleList()
        self._trainable: list[torch.nn.Parameter] = []  # listed by configure_optimizers
        self._guard = StepGuard()
        self._linear_modules: list[str] | None = None  # from config.json, by linear_modules()
        self._architecture: Architecture | None = None  # from config.json, by architecture()

    # ----------------------------------------------------------------- building
    def _strategy(self) -> Strategy | None:
        """The trainer's strategy, or None for a module used on its own (tests, notebooks)."""
        try:
            return self.trainer.strategy
        except RuntimeError:  # Lightning's "is not attached to a `Trainer`"
            return None

    def _fitting(self) -> bool:
        """Whether the module is built for fit (or on its own, as fit builds it), where `model.adapter` is what
        training starts from; the other subcommands pass the trained adapter there."""
        try:
            return self.trainer.state.fn == TrainerFn.FITTING
        except RuntimeError:  # Lightning's "is not attached to a `Trainer`"
            return True

    def architecture(self) -> Architecture:
        """The model family's row of `architectures.py`, from config.json alone; an unsupported one fails here."""
        if self._architecture is None:
            hp = self.hparams
            self._architecture = architecture(read_model_config(hp.model_name_or_path, hp.trust_remote_code))
        return self._architecture

    @property
    def target_modules(self) -> list[str]:
        """The LoRA targets: `model.target_modules`, or the family's own when it is unset."""
        asked = self.hparams.target_modules
        return list(asked) if asked is not None else list(self.architecture().lora_targets)

    def skeleton(self) -> torch.nn.Module:
        """The configured model without weights (on the meta device), from its config.json alone."""
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        config = read_model_config(hp.model_name_or_path, hp.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=hp.trust_remote_code)

    def linear_modules(self) -> list[str]:
        """The leaf names of the configured model's linear layers, from its config.json (the skeleton is built once:
        the CLI's checks ask before the data loads, and `configure_model` again)."""
        if self._linear_modules is None:
            self._linear_modules = linear_module_names(self.skeleton())
        return self._linear_modules

    def check_targets(self) -> None:
        """Fail before any weights load if a LoRA target is missing, or one the family's kernels bypass."""
        check_target_modules(self.linear_modules(), self.target_modules, self.architecture())

    def check_checkpoint(self, path: str | Path) -> None:
        """Fail before any weights load if a checkpoint or adapter directory cannot fit this model."""
        hp = self.hparams
        check_matches(path, hp.lora_r, hp.lora_alpha, self.target_modules, self.skeleton())

    def prepare_data(self) -> None:
        """`random_init`: write the random checkpoint here, once per node (local rank 0), not once per rank.

        A random Falcon-40B is 80 GB of bf16 built in host memory: eight ranks building it at once would not fit.
        """
        if self.hparams.random_init:
            self._random_checkpoint()

    def _random_checkpoint(self) -> str:
        hp = self.hparams
        return str(random_checkpoint(resolve(hp.model_name_or_path), hp.random_init_dir, hp.trust_remote_code))

    def configure_model(self) -> None:
        """Load the quantized base and add LoRA. Idempotent; runs inside the strategy's init context."""
        if self.model is not None:
            self._check_reference()
            return
        hp = self.hparams
        self.check_targets()
        strategy = self._strategy()
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        compute_dtype = resolve_compute_dtype(hp.compute_dtype, device)
        load_device, quant_storage = base_placement(strategy, device)
        # With random_init, prepare_data has written the checkpoint already: this only finds it.
        path = self._random_checkpoint() if hp.random_init else resolve(hp.model_name_or_path)
        self.base_path, self.compute_dtype = path, compute_dtype  # recorded beside the adapter
        base = load_causal_lm(
            path,
            quantization=hp.quantization,
            double_quant=hp.double_quant,
            compute_dtype=compute_dtype,
            device=load_device,
            trust_remote_code=hp.trust_remote_code,
            attn_implementation=hp.attn_implementation or default_implementation(device, compute_dtype),
            quant_storage=quant_storage,
        )
        if hp.fused_attention and self.architecture().routes_attention:
            route_falcon_attention(base, attend)
        if device.type == "cuda":  # train/peak_mem_gib then reports training, not the load
            torch.cuda.reset_peak_memory_stats(device)
        quantized = quantized_layers(base)
        if hp.quantization != "none" and not quantized:
            raise RuntimeError(f"{path} loaded with quantization={hp.quantization} but no layer was quantized")
        self.model = apply_lora(
            base,
            hp.lora_r,
            hp.lora_alpha,
            hp.lora_dropout,
            self.target_modules,
            hp.gradient_checkpointing,
            hp.upcast_frozen,
        )
        if hp.adapter is not None:
            self._load_lora(Path(hp.adapter).expanduser())
            if hp.objective in REFERENCED and self._fitting():
                add_reference(self.model)
        # from_pretrained returns eval mode, and Lightning 2.6 keeps submodule modes as it finds them:
        # without this, dropout (LoRA's included) would be silently off for the whole fit.
        self.model.train()
        self.report = parameter_report(self.model, quantized)

    def _load_lora(self, path: Path) -> None:
        """The LoRA weights of an adapter directory or of a `.ckpt` (checked against this model first)."""
        if path.is_dir():
            load_weights(self.model, path)
        else:
            checkpoint = load_weights_only(path)
            self.on_load_checkpoint(checkpoint)
            self.load_state_dict(checkpoint["state_dict"], strict=False)  # LoRA weights only, by design
        rank_zero_info(f"[model] LoRA weights loaded from {path}")

    def _check_reference(self) -> None:
        """Fail when fit gets a model built by another stage (which left out the frozen copy of `model.adapter`).
        Checked in `configure_model`, before any callback's `on_fit_start` can compute the reference."""
        hp = self.hparams
        if (
            hp.objective in REFERENCED
            and hp.adapter is not None
            and self._fitting()
            and REFERENCE not in self.model.peft_config
        ):
            raise ConfigError(
                f"model.objective {hp.objective} from model.adapter {hp.adapter}: this model was built outside fit "
                "(by validate, test or predict), so its reference would be the base, not that adapter. "
                "Fix: build a new FalconQLoRA for fit"
            )

    def on_fit_start(self) -> None:
        rank_zero_info(f"[model] {self.report}")
        metrics = {
            "model/quantized_layers": self.report.quantized_layers,
            "model/trainable_params": self.report.trainable,
            "model/total_params": self.report.total,
            "model/footprint_mib": self.report.footprint_bytes / 2**20,
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)

    def on_train_start(self) -> None:
        self._guard.reset()  # a fit stopped inside an accumulation window left its losses
        # After the checkpoint is restored: a resumed run states where it continues.
        trainer = self.trainer
        rank_zero_info(
            f"[fit] world size {trainer.world_size} ({trainer.num_nodes} node(s) x {trainer.num_devices} device(s), "
            f"{type(trainer.strategy).__name__}); step {trainer.global_step} of {trainer.max_steps}"
        )

    # ----------------------------------------------------------------- steps
    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """The base model alone inside the block: every forward and generation skips the LoRA adapter."""
        self._adapter_enabled = False
        try:
            yield
        finally:
            self._adapter_enabled = True

    def _adapter(self):
        return contextlib.nullcontext() if self._adapter_enabled else self.model.disable_adapter()

    def reference(self) -> contextlib.AbstractContextManager:
        """Inside this context the model is the preference objectives' reference: the frozen copy of `model.adapter`
        when fit started from one, else the base alone."""
        if REFERENCE in self.model.peft_config:
            return active_adapter(self.model, REFERENCE)
        return self.model.disable_adapter()

    def _attention_mask(self, attention_mask, position_ids):
        """`position_ids` marks packed batches (`data.batching: packed`): examples restart at position 0."""
        if position_ids is None:
            return attention_mask
        return packed_attention_mask(position_ids, attn_implementation(self.model.config), self.compute_dtype)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        """The model's own output: logits at every position, and its loss when `labels` are given."""
        with self._adapter():
            return self.model(
                input_ids=input_ids,
                attention_mask=self._attention_mask(attention_mask, position_ids),
                position_ids=position_ids,
                labels=labels,
                use_cache=False,
            )

    def _hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's final hidden states for the batch (the output layer not applied)."""
        causal_lm = self.model.get_base_model()  # the transformers model, LoRA layers inside
        return causal_lm.base_model(
            input_ids=batch["input_ids"],
            attention_mask=self._attention_mask(batch.get("attention_mask"), batch.get("position_ids")),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state

    def _head(self) -> torch.nn.Module:
        return output_layer(self.model.get_base_model(), self.architecture().logit_scale)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean next-token loss over the batch's label tokens; chunked unless `loss_chunk_size` is None."""
        chunk = self.hparams.loss_chunk_size
        if chunk is None:
            return self(**batch).loss
        with self._adapter():
            hidden = self._hidden(batch)
        labels = batch["labels"]
        chunks = self._chunks(labels[:, 1:].numel())
        return chunked_causal_lm_loss(hidden, self._head(), labels, chunk, chunks)

    def _chunks(self, positions: int | torch.Tensor) -> int:
        """How many times the output layer runs for `positions` scored positions: under ZeRO-3 each call gathers its
        weight, a collective, so every rank calls it as often as the rank with the most positions needs (ranks pad
        their batches to different widths); else 1 (at least: as many as the positions need)."""
        chunk, strategy = self.hparams.loss_chunk_size, self._strategy()
        if chunk is None or strategy is None or zero_stage(strategy) != 3:
            return 1
        needed = (torch.as_tensor(positions) + chunk - 1) // chunk
        needed = needed.to(strategy.root_device)
        torch.distributed.all_reduce(needed, op=torch.distributed.ReduceOp.MAX)
        return int(needed)

    def reference_logps(self, batch: dict[str, torch.Tensor], chunks: int | None = None) -> torch.Tensor:
        """The reference's summed answer log-probability of each sequence of a batch of pairs, without gradients
        (`chunks`: the output-layer calls, when the caller has agreed them with the other ranks already)."""
        if chunks is None:
            chunks = self._chunks((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad(), self.reference():
            hidden = self._hidden(batch)
            logps, _ = sequence_logps(hidden, self._head(), batch["labels"], self.hparams.loss_chunk_size, chunks)
        return logps

    def pair_loss(self, batch: dict[str, torch.Tensor]) -> PairLoss:
        """The preference objective on a batch of pairs (`input_ids` holds the chosen sequences, then the rejected
        ones): one forward for both, and one of the reference unless the batch carries its `reference_logps`."""
        hp = self.hparams
        with self._adapter():
            hidden = self._hidden(batch)
        chunks = self._chunks((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        logps, counts = sequence_logps(hidden, self._head(), batch["labels"], hp.loss_chunk_size, chunks)
        reference = None
        if hp.objective in REFERENCED:
            reference = batch.get("reference_logps")
            if reference is None:
                reference = self.reference_logps(batch, chunks)  # the same answers: the same calls
        return pair_loss(hp.objective, logps, counts, reference, hp.beta, hp.label_smoothing)

    def training_step(self, batch, batch_idx):
        paired = self.hparams.objective in PAIRED
        result = self.pair_loss(batch) if paired else None
        loss = result.loss if paired else self.batch_loss(batch)
        self._guard.add_loss(loss)  # checked with the gradient norm, before the optimizer step
        if logging_step(self.trainer):  # only on the steps Lightning writes: a log call is not free
            rows = batch["input_ids"].shape[0] // (2 if paired else 1)
            self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=rows)
            if paired:
                for name, value in result.metrics().items():
                    self.log(f"train/{name}", value.mean(), on_step=True, batch_size=rows)
        return loss

    def setup(self, stage: str) -> None:
        # Made here, before the strategy moves the module, so that every rank holds the same metrics.
        datamodule = getattr(self.trainer, "datamodule", None)
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        self.reply_marker = getattr(datamodule, "reply_marker", "")
        names = list(getattr(datamodule, "val_names", []))
        if len(names) > 1:  # one source: its loss is val/loss
            self.source_names = names
            self.source_loss = torch.nn.ModuleList(MeanMetric() for _ in names)

    def _eval_step(self, batch, stage: str, source: int | None = None) -> torch.Tensor:
        if self.hparams.objective in PAIRED:
            result = self.pair_loss(batch)
            loss, n = result.loss, batch["input_ids"].shape[0] // 2  # a mean over the pairs
            for metric, value in zip(self.eval_pairs[stage], result.metrics().values(), strict=True):
                metric.update(value)
        else:
            loss = self.batch_loss(batch)
            n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the tokens that mean is over (shifted by one)
        self.eval_loss[stage].update(loss.detach(), weight=n)  # token-weighted mean over the epoch
        if source is not None and self.source_names:
            self.source_loss[source].update(loss.detach(), weight=n)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, "test")

    def _log_eval_epoch(self, stage: str) -> None:
        loss = self.eval_loss[stage].compute()  # synced across ranks by torchmetrics
        self.eval_loss[stage].reset()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        if self.hparams.objective not in PAIRED:
            self.log(f"{stage}/perplexity", torch.exp(loss))
            return
        for name, metric in zip(METRICS, self.eval_pairs[stage], strict=True):
            self.log(f"{stage}/{name}", metric.compute())
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")
        for name, metric in zip(self.source_names, self.source_loss, strict=True):
            self.log(f"val/loss/{name}", metric.compute())
            metric.reset()

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")

    def generate(self, prompts: list[list[int]], batch_size: int | None = None) -> list[Generated]:
        """Generate for token prompts with the `generation` settings (every rank takes part under ZeRO-3)."""
        batch_size = batch_size or len(prompts)
        synced = zero_stage(self.trainer.strategy) == 3
        with self._adapter():
            return generate(
                self.model,
                self.tokenizer,
                prompts,
                self.generation,
                batch_size,
                synced,
                self.device,
                marker=self.reply_marker,
            )

    def predict_step(self, batch, batch_idx) -> list[tuple[str, Generated]]:
        """Each input text with what was generated for it."""
        return list(zip(batch["inputs"], self.generate(batch["prompt_ids"]), strict=True))

    def on_before_optimizer_step(self, optimizer) -> None:
        # The LoRA weights, listed once in configure_optimizers: not a walk over every parameter each step.
        grad_norm = self._guard.check(self.trainer, self._trainable)
        if grad_norm is not None and logging_step(self.trainer):
            log_to_loggers(self.trainer, {"train/grad_norm": grad_norm.item()})

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the norm `on_before_optimizer_step` just computed, instead of Lightning computing it again.

        Only where every rank holds whole, plain gradients (one device or DDP, after the all-reduce); DeepSpeed
        clips inside its engine and FSDP shards them, so those keep Lightning's path.
        """
        if not (
            gradient_clip_val
            and clips_by_norm_itself(self.trainer)
            and self._guard.clip(self._trainable, gradient_clip_val)
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------- optimization
    def configure_optimizers(self):
        hp = self.hparams
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        fused = hp.fused_adamw and fused_adamw_fits(self.trainer)
        opt = optimizer(self._trainable, hp.optimizer, hp.learning_rate, hp.weight_decay, hp.betas, fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        factor = lr_factor(hp.warmup_steps, total, hp.lr_schedule, hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": lr_scheduler(opt, factor)}

    # ----------------------------------------------------------------- checkpoints
    def _trainable_shapes(self) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable (LoRA) weights: a 7B run's checkpoint is tens of MB, not GB."""
        trainable = self._trainable_shapes()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        poisoned = [k for k, v in checkpoint["state_dict"].items() if not bool(torch.isfinite(v).all())]
        if poisoned:  # never let NaN weights replace a good last.ckpt
            raise NonFiniteLoss(
                f"{len(poisoned)} LoRA weights hold NaN or inf at step {self.trainer.global_step} "
                f"(e.g. {poisoned[0]}); the checkpoint was not written. "
                "Fix: lower --model.learning_rate, or use bf16 rather than fp16"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose LoRA weights do not match this model, naming the difference."""
        if "state_dict" not in checkpoint:  # DeepSpeed restores its (partitioned) weights itself
            return
        expected, saved = self._trainable_shapes(), checkpoint["state_dict"]
        missing = sorted(set(expected) - set(saved))
        wrong = [
            f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k])}"
            for k in expected
            if k in saved and saved[k].shape != expected[k]
        ]
        if missing or wrong:
            detail = (
                f"{len(missing)} LoRA weights missing (e.g. {missing[0]})"
                if missing
                else f"shape mismatch ({wrong[0]})"
            )
            raise ConfigError(
                f"checkpoint does not match the model: {detail}. "
                "Fix: use the lora_r/target_modules the checkpoint was trained with"
            )
