"""Every place lightning_falcon leans on a library's internals or undocumented behaviour: `TOUCH_POINTS`.

A new release of lightning, transformers, peft, bitsandbytes, deepspeed, torch, datasets, jsonargparse, gguf or
tokenizers may change any of these without notice. Each `TouchPoint` says what is relied on, where, and why no
public API serves, and names its canary in `tests/test_upstream.py`: a test that fails, naming the touch point,
when the library underneath changes (a test there checks that the registry and the canaries agree).
`pyproject.toml` bounds those libraries above, and `docs/reference/touch-points.md` is generated from the registry.
The reaches that are expressions live in `lightning_falcon/upstream.py`, as functions the package calls.

This module is data and imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TouchPoint:
    """One reach into a library: what is relied on, where, why no public API serves, and the canary watching it."""

    library: str  # "lightning", "transformers", "peft", "bitsandbytes", "deepspeed", "torch", "datasets", ...
    what: str  # the internal or undocumented behaviour relied on, one sentence
    where: str  # our code that relies on it: "lightning_falcon/<path>.py:<symbol>"
    why: str  # why no public API serves, one sentence
    canary: str  # the name of the test function in tests/test_upstream.py that fails when it changes


TOUCH_POINTS: tuple[TouchPoint, ...] = (
    # ------------------------------------------------------------- lightning
    TouchPoint(
        "lightning",
        "`logger: true` makes `TensorBoardLogger(save_dir=default_root_dir, version=SLURMEnvironment.job_id())`.",
        "lightning_falcon/upstream.py:default_logger",
        "`--ckpt_path last` is resolved before the trainer exists, and Lightning builds its default logger inside "
        "the trainer with no factory to ask.",
        "test_lightning_still_makes_its_default_logger_as_default_logger_does",
    ),
    TouchPoint(
        "lightning",
        "A logger made from its config only computes `root_dir` and `log_dir` (the next version): it creates no "
        "directory and writes nothing until it logs.",
        "lightning_falcon/commands/cli.py:configured_logger",
        "`--ckpt_path last` and predict's default output read the run's directories from the config, before the "
        "trainer exists; Lightning documents the paths, not that making a logger leaves the disk alone.",
        "test_a_lightning_logger_writes_nothing_until_it_logs",
    ),
    TouchPoint(
        "lightning",
        "`LightningCLI.__init__` calls `self._parse_ckpt_path()`, which `FalconCLI` overrides to do nothing.",
        "lightning_falcon/commands/cli.py:FalconCLI._parse_ckpt_path",
        "Lightning swaps the model config for a checkpoint file's hyperparameters, dropping the user's `--model.*` "
        "overrides, and has no setting to keep them.",
        "test_lightning_cli_still_calls_parse_ckpt_path_which_the_cli_overrides",
    ),
    TouchPoint(
        "lightning",
        "`trainer._logger_connector.should_update_logs` says whether this step's logs are written.",
        "lightning_falcon/upstream.py:logging_step",
        "Lightning keeps the every-`log_every_n_steps` decision private, and train scalars are computed only then.",
        "test_trainer_keeps_the_logging_decision_and_the_stepped_batch_count",
    ),
    TouchPoint(
        "lightning",
        "`trainer.fit_loop.epoch_loop._batches_that_stepped` is the step `self.log` writes metrics at.",
        "lightning_falcon/upstream.py:logged_step",
        "No public property gives the step Lightning's loggers use, which is not `global_step`.",
        "test_trainer_keeps_the_logging_decision_and_the_stepped_batch_count",
    ),
    TouchPoint(
        "lightning",
        "Metrics written straight to `trainer.loggers` at `logged_step` land on the steps of `self.log`.",
        "lightning_falcon/upstream.py:log_to_loggers",
        "`self.log` costs about a millisecond a call; Lightning's own LearningRateMonitor writes to the loggers alike.",
        "test_direct_logger_writes_land_on_the_steps_of_self_log",
    ),
    TouchPoint(
        "lightning",
        "`ModelCheckpoint._last_global_step_saved` is the global step of its last completed save.",
        "lightning_falcon/upstream.py:last_saved_step",
        "The public `last_model_path` is set before the file is written, so it cannot say a good copy exists.",
        "test_model_checkpoint_records_its_last_completed_save",
    ),
    TouchPoint(
        "lightning",
        "`ModelCheckpoint._last_checkpoint_saved` is the file of its last completed save.",
        "lightning_falcon/upstream.py:last_saved_path",
        "The public `last_model_path` is set before the file is written, so it cannot say a good copy exists.",
        "test_model_checkpoint_records_its_last_completed_save",
    ),
    TouchPoint(
        "lightning",
        "`trainer._accelerator_connector.cluster_environment` holds a single-device run's cluster environment, "
        "where Lightning's SIGUSR1 handler reads `auto_requeue`.",
        "lightning_falcon/upstream.py:cluster_environment",
        "A single-device strategy has no public `cluster_environment`.",
        "test_a_single_device_trainer_keeps_its_cluster_environment_where_lightnings_sigusr1_handler_reads_it",
    ),
    TouchPoint(
        "lightning",
        "`DeepSpeedStrategy._init_config_if_needed()` builds the strategy's DeepSpeed config when asked.",
        "lightning_falcon/training/strategy.py:QLoRADeepSpeedStrategy.prepare_quantized_load",
        "The config must exist before the quantized load hands it to transformers, and Lightning builds it only in "
        "`setup`, after the load.",
        "test_lightning_deepspeed_strategy_still_has_init_config_if_needed",
    ),
    TouchPoint(
        "lightning",
        "`_init_config_if_needed()` writes the trainer's precision into the DeepSpeed config as `bf16.enabled` or "
        "`fp16.enabled`.",
        "lightning_falcon/training/strategy.py:deepspeed_param_dtype",
        "Lightning exposes no dtype DeepSpeed keeps parameters in, which the packed 4-bit weights must be stored in.",
        "test_lightning_writes_the_precision_into_the_deepspeed_config",
    ),
    TouchPoint(
        "lightning",
        "`DeepSpeedStrategy.__init__` builds its DeepSpeed config from a dict, a JSON file, `PL_DEEPSPEED_CONFIG_PATH` "
        "or its ZeRO arguments, restated here without building a strategy.",
        "lightning_falcon/upstream.py:deepspeed_strategy_config",
        "plan checks a run where DeepSpeed may not be installed, and Lightning has no function returning the config.",
        "test_lightning_deepspeed_strategy_still_builds_its_config_as_plan_reads_it",
    ),
    TouchPoint(
        "lightning",
        "`DeepSpeedStrategy.setup` builds the engine in `init_deepspeed()`, after which `deepspeed_engine` is it.",
        "lightning_falcon/training/strategy.py:QLoRADeepSpeedStrategy.init_deepspeed",
        "Lightning has no hook between building the engine and training, where its checkpointed state is filtered.",
        "test_lightning_deepspeed_strategy_builds_its_engine_in_init_deepspeed",
    ),
    TouchPoint(
        "lightning",
        "`StrategyRegistry[name]` is a dict holding the strategy class under `strategy` and its arguments under "
        "`init_params`.",
        "lightning_falcon/upstream.py:registered_strategy",
        "The registry's entries are undocumented, and plan reads a named strategy's settings without building it.",
        "test_lightning_keeps_a_strategys_class_and_arguments_where_the_settings_read_them",
    ),
    TouchPoint(
        "lightning",
        "`DeepSpeedStrategy` keeps its `exclude_frozen_parameters` argument as an attribute of that name.",
        "lightning_falcon/training/strategy.py:StrategySettings.of",
        "Lightning documents the argument, not where the strategy keeps it.",
        "test_lightning_keeps_a_strategys_class_and_arguments_where_the_settings_read_them",
    ),
    TouchPoint(
        "lightning",
        "A DeepSpeed checkpoint Lightning writes is a directory holding DeepSpeed's `latest` file and a `checkpoint` "
        "tag directory of shards.",
        "lightning_falcon/runs.py:is_deepspeed_checkpoint",
        "Lightning documents a directory, not its layout, and `--ckpt_path` must tell it from an adapter directory.",
        "test_a_lightning_deepspeed_checkpoint_is_a_directory_with_latest_and_a_checkpoint_tag",
    ),
    TouchPoint(
        "lightning",
        "`RichProgressBar._get_train_description(current_epoch)` gives the train bar's text; `ProgressBar` overrides "
        "it.",
        "lightning_falcon/training/progress.py:ProgressBar._get_train_description",
        "Lightning's text reads `Epoch 0/-2` in a run bounded by steps, and no public hook sets it.",
        "test_lightnings_rich_bar_still_describes_the_train_bar_with_get_train_description",
    ),
    TouchPoint(
        "lightning",
        "`RichProgressBar.on_train_batch_end` sets the train bar to `batch_idx + 1`, so a skipped call loses nothing.",
        "lightning_falcon/training/progress.py:ProgressBar.on_train_batch_end",
        "The bar's `refresh_rate` paces its drawing thread, not its update at every step, which has no setting.",
        "test_rich_bar_sets_the_train_bar_to_the_batch_it_is_given",
    ),
    TouchPoint(
        "lightning",
        "The texts of Lightning's accelerator, strategy and device errors hold those words "
        "(`LIGHTNING_MACHINE_ERROR`).",
        "lightning_falcon/upstream.py:LIGHTNING_MACHINE_ERROR",
        "Lightning raises the same exception types for the machine and for a bad setting; only the text tells them "
        "apart.",
        "test_lightning_trainer_errors_about_the_machine_still_read_as_such",
    ),
    TouchPoint(
        "lightning",
        "Callbacks' `setup` runs before the trainer registers its signal handlers, and with `auto_requeue` turned off "
        "there Lightning installs no SIGUSR1 handler.",
        "lightning_falcon/training/preemption.py:SlurmRequeue.setup",
        "Lightning builds the SLURMEnvironment itself and documents `auto_requeue` only as its constructor argument.",
        "test_lightning_registers_signal_handlers_between_setup_and_on_train_start",
    ),
    TouchPoint(
        "lightning",
        "Lightning installs its SIGTERM handler before `on_train_start`, so a handler set there replaces it for fit.",
        "lightning_falcon/training/preemption.py:SlurmRequeue.on_train_start",
        "Lightning's SIGTERM handler broadcasts inside the handler, and no setting leaves SIGTERM alone.",
        "test_lightning_registers_signal_handlers_between_setup_and_on_train_start",
    ),
    TouchPoint(
        "lightning",
        "Calling `ModelCheckpoint.on_train_batch_end` directly writes the periodic checkpoint due at that step, and "
        "Lightning runs ModelCheckpoint callbacks after all others.",
        "lightning_falcon/upstream.py:write_due_checkpoints",
        "ModelCheckpoint has no public method to save what is due now, before the run stops at a signal.",
        "test_model_checkpoint_saves_when_its_batch_end_hook_is_called_directly",
    ),
    TouchPoint(
        "lightning",
        "A `last_model_path` set on ModelCheckpoint from outside is kept in its `state_dict` and restored with it.",
        "lightning_falcon/training/preemption.py:save_last",
        "ModelCheckpoint's bookkeeping of `last.ckpt` is not public API, and the interruption's `last.ckpt` must be "
        "the one its next save replaces.",
        "test_model_checkpoint_keeps_a_last_model_path_set_from_outside",
    ),
    TouchPoint(
        "lightning",
        "`trainer.save_checkpoint` builds the checkpoint on every rank, callbacks' `state_dict` and "
        "`on_save_checkpoint` before the module's `on_save_checkpoint`, before the strategy writes it.",
        "lightning_falcon/training/rng.py:RNGState.state_dict",
        "Lightning documents that every rank calls `save_checkpoint`, not that the hooks run on every rank, and each "
        "rank's generators are gathered there.",
        "test_lightning_builds_the_checkpoint_on_every_rank_callbacks_first",
    ),
    TouchPoint(
        "lightning",
        "`trainer.save_checkpoint` calls callbacks' `state_dict` on every rank.",
        "lightning_falcon/training/throughput.py:TokenThroughput.state_dict",
        "Lightning documents that every rank calls `save_checkpoint`, not that the hooks run on every rank, and the "
        "token count is summed over the ranks there.",
        "test_lightning_builds_the_checkpoint_on_every_rank_callbacks_first",
    ),
    TouchPoint(
        "lightning",
        "`trainer.save_checkpoint` calls callbacks' `on_save_checkpoint` on every rank, before the module's own and "
        "before anything is written, and only for full checkpoints.",
        "lightning_falcon/training/disk_space.py:DiskSpaceCheck.on_save_checkpoint",
        "Lightning documents the hook, not that every rank runs it before the write, where the ranks decide together.",
        "test_lightning_builds_the_checkpoint_on_every_rank_callbacks_first",
    ),
    TouchPoint(
        "lightning",
        "Lightning saves a train loader's `state_dict()` in the checkpoint and gives it to `load_state_dict` on "
        "resume.",
        "lightning_falcon/data/sampler.py:ResumableLoader",
        "Lightning documents stateful loaders through torchdata's `StatefulDataLoader`, not a plain DataLoader with "
        "the two methods.",
        "test_lightning_checkpoints_a_train_loaders_state_and_fetches_no_batch_ahead",
    ),
    TouchPoint(
        "lightning",
        "With a train loader that has a length, Lightning fetches no batch ahead of the step, so the batches a loader "
        "handed out are the batches trained on.",
        "lightning_falcon/data/sampler.py:ResumableLoader.__iter__",
        "Prefetching is an internal detail of Lightning's data fetcher.",
        "test_lightning_checkpoints_a_train_loaders_state_and_fetches_no_batch_ahead",
    ),
    TouchPoint(
        "lightning",
        "`LightningModule.trainer` raises RuntimeError when no Trainer is attached.",
        "lightning_falcon/model/module.py:FalconQLoRA._strategy",
        "Lightning has no public way to ask whether a module is attached to a trainer.",
        "test_a_module_without_a_trainer_still_raises_runtime_error",
    ),
    TouchPoint(
        "lightning",
        "torch's fused AdamW says it unscales its gradients itself (`_step_supports_amp_scaling`), so Lightning's "
        "MixedPrecision skips unscaling them before its step and refuses to clip for it.",
        "lightning_falcon/model/step_policy.py:fused_adamw_fits",
        "Lightning documents neither, and with fp16 AMP the NaN guard would then read scaled gradients.",
        "test_lightning_mixed_precision_leaves_unscaling_and_clipping_to_a_fused_adamw",
    ),
    TouchPoint(
        "lightning",
        "LightningCLI runs `before_<subcommand>` before it reads that subcommand's arguments (`ckpt_path`) from "
        "`config_init`.",
        "lightning_falcon/commands/cli.py:FalconCLI.check_run",
        "LightningCLI documents the hooks, not that a value set in them reaches the trainer's call.",
        "test_lightning_cli_reads_the_subcommand_arguments_after_its_before_hook",
    ),
    TouchPoint(
        "lightning",
        "`LightningCLI.instantiate_trainer` adds `trainer_defaults['callbacks']` as they are when it runs.",
        "lightning_falcon/commands/cli.py:FalconCLI.instantiate_trainer",
        "The product's callbacks depend on the parsed config, and LightningCLI documents defaults given at "
        "construction only.",
        "test_lightning_cli_adds_the_default_callbacks_when_it_builds_the_trainer",
    ),
    TouchPoint(
        "lightning",
        "SLURMEnvironment's rendezvous is `MASTER_ADDR` when set, else `resolve_root_node_address` of the job's nodes.",
        "lightning_falcon/commands/slurm_args.py:Allocation.from_env",
        "Lightning documents neither the choice nor a way to make it without setting `MASTER_ADDR`.",
        "test_slurm_environment_meets_where_slurm_args_checks",
    ),
    # ------------------------------------------------------------- transformers
    TouchPoint(
        "transformers",
        "Falcon builds its projections from the module global `modeling_falcon.FalconLinear`, swapped for "
        "`nn.Linear` while it is built.",
        "lightning_falcon/upstream.py:falcon_linear_as_nn_linear",
        "transformers' quantizer replaces only exact `nn.Linear` modules, and has no hook to take subclasses.",
        "test_falcon_builds_its_projections_from_the_module_global_that_is_swapped",
    ),
    TouchPoint(
        "transformers",
        "`config._attn_implementation` names the attention backend transformers resolved.",
        "lightning_falcon/upstream.py:attn_implementation",
        "transformers exposes the setting it was given, not the backend it resolved.",
        "test_a_model_config_names_the_attention_backend_transformers_resolved",
    ),
    TouchPoint(
        "transformers",
        "`FalconAttention.forward` (transformers 5.24, the rotary SDPA branch) is restated, handing keys and values at "
        "their own head count to `attend`.",
        "lightning_falcon/upstream.py:_falcon_attention_forward",
        "Falcon calls SDPA itself, not through transformers' attention interface, so no registered attention function "
        "can replace it.",
        "test_falcon_attention_is_the_one_the_fused_forward_restates",
    ),
    TouchPoint(
        "transformers",
        "A `forward` set on a `FalconAttention` instance replaces that layer's attention alone.",
        "lightning_falcon/upstream.py:route_falcon_attention",
        "transformers has no per-model hook for Falcon's attention.",
        "test_the_fused_forward_takes_the_place_of_falcon_attentions_own_on_each_layer",
    ),
    TouchPoint(
        "transformers",
        "Falcon always hands its attention an explicit boolean mask (`create_causal_mask` never skips it), never "
        "`is_causal`, so CUDA's SDPA runs its memory-efficient kernel.",
        "lightning_falcon/model/attention.py:gpu_kernel",
        "Which mask transformers builds, and so which kernel SDPA runs, is not part of its API; plan counts memory "
        "by it.",
        "test_falcon_always_hands_its_attention_a_mask",
    ),
    TouchPoint(
        "transformers",
        "A 4-D attention mask and `position_ids` given to Falcon reach its attention as they are: a boolean mask for "
        "SDPA, an additive one for eager.",
        "lightning_falcon/data/batching.py:packed_attention_mask",
        "transformers documents packed sequences only through FlashAttention-2's position ids.",
        "test_falcon_takes_a_packed_batchs_mask_and_positions_as_given",
    ),
    TouchPoint(
        "transformers",
        "Falcon's attention computes with one key/value head under `multi_query` without `new_decoder_architecture`, "
        "else with `config.num_kv_heads`: restated from the config for the planner and the GGUF writer.",
        "lightning_falcon/architectures.py:_falcon_kv_heads",
        "The config's `num_kv_heads` is not the count Falcon's attention uses, which transformers does not expose.",
        "test_falcon_attention_computes_with_the_kv_heads_plan_and_gguf_count",
    ),
    TouchPoint(
        "transformers",
        "`integrations.deepspeed.unset_hf_deepspeed_config()` forgets the ZeRO-3 config `HfDeepSpeedConfig` "
        "registered.",
        "lightning_falcon/upstream.py:forget_hf_deepspeed_config",
        "transformers documents registering a DeepSpeed config, not undoing it, and later loads would stay ZeRO-3.",
        "test_transformers_can_still_forget_a_deepspeed_config",
    ),
    TouchPoint(
        "transformers",
        "A bitsandbytes load sets `model.is_loaded_in_4bit` or `model.is_loaded_in_8bit`.",
        "lightning_falcon/upstream.py:loaded_in_kbit",
        "transformers documents no flag for a k-bit model; these are the ones its quantizers set and PEFT reads.",
        "test_a_bitsandbytes_load_still_marks_the_model_as_kbit",
    ),
    TouchPoint(
        "transformers",
        "`model.hf_quantizer.remove_quantization_config(model)` marks a model as unquantized: no "
        "`quantization_config`, and castable.",
        "lightning_falcon/upstream.py:forget_quantization",
        "`model.dequantize()` does it only after expanding every layer at once, and no public call does it alone.",
        "test_transformers_quantizer_still_forgets_a_models_quantization",
    ),
    TouchPoint(
        "transformers",
        "`get_memory_footprint()` counts parameters and buffers only, not bitsandbytes' quantization constants.",
        "lightning_falcon/model/lora.py:parameter_report",
        "transformers does not say what the footprint leaves out, and the report adds the constants itself.",
        "test_memory_footprint_still_leaves_out_the_quantization_constants",
    ),
    TouchPoint(
        "transformers",
        "`from_pretrained` of a config or tokenizer raises OSError for a name neither a local directory nor on the "
        "Hub (or in its cache).",
        "lightning_falcon/data/tokenizer.py:load_tokenizer",
        "transformers documents no exception type for a missing model, and the error must be one line with a fix.",
        "test_transformers_still_raises_oserror_for_a_missing_model",
    ),
    TouchPoint(
        "transformers",
        "`AutoConfig.from_pretrained` raises OSError for a model it cannot find.",
        "lightning_falcon/model/config.py:read_model_config",
        "transformers documents no exception type for a missing model, and the error must be one line with a fix.",
        "test_transformers_still_raises_oserror_for_a_missing_model",
    ),
    TouchPoint(
        "transformers",
        "`from_pretrained(..., local_files_only=True)` raises OSError for a model or tokenizer missing in the cache.",
        "lightning_falcon/commands/prefetch.py:check_offline",
        "transformers documents no exception type for a missing model, and prefetch must say what is not cached.",
        "test_transformers_still_raises_oserror_for_a_missing_model",
    ),
    TouchPoint(
        "transformers",
        "`AutoConfig.from_pretrained(..., local_files_only=True)` raises OSError for a model not in the cache.",
        "lightning_falcon/commands/plan.py:model_config",
        "transformers documents no exception type for a missing model, and plan then falls back to a shipped config.",
        "test_transformers_still_raises_oserror_for_a_missing_model",
    ),
    TouchPoint(
        "transformers",
        "`TextStreamer.on_finalized_text(text, stream_end)` receives the decoded reply piece by piece; chat's "
        "`Streamer` overrides it.",
        "lightning_falcon/commands/chat.py:Streamer.on_finalized_text",
        "The documented streamer interface is `put`/`end` of token ids; decoding them to clean text is TextStreamer's "
        "undocumented method.",
        "test_text_streamer_still_hands_its_text_to_on_finalized_text",
    ),
    TouchPoint(
        "transformers",
        "transformers' warmup and cosine schedules are a `LambdaLR` whose multiplier is `lr_lambdas[0]`.",
        "lightning_falcon/model/step_policy.py:lr_factor",
        "transformers documents the scheduler it returns, not its multiplier, which is shifted a step in warmup here.",
        "test_transformers_schedules_keep_their_multiplier_in_lr_lambdas",
    ),
    # ------------------------------------------------------------- peft
    TouchPoint(
        "peft",
        "PEFT keys LoRA weights `base_model.model.<module>.lora_A.weight` in `adapter_model.safetensors` and "
        "`...lora_A.<adapter>.weight` in memory.",
        "lightning_falcon/upstream.py:lora_weight_name",
        "PEFT documents saving and loading an adapter, not its keys, which the checks read before any model loads.",
        "test_peft_saves_lora_weights_under_the_keys_the_checks_read",
    ),
    TouchPoint(
        "peft",
        "`adapter_config.json` holds LoraConfig's fields under their names (`r`, `lora_alpha`, `target_modules`, "
        "`base_model_name_or_path`), and the weights are `adapter_model.safetensors` (`.bin` before).",
        "lightning_falcon/model/adapter.py:read_saved_lora",
        "PEFT documents `LoraConfig`, not the file layout, which is read here without loading a model.",
        "test_peft_saves_lora_weights_under_the_keys_the_checks_read",
    ),
    TouchPoint(
        "peft",
        "`adapter_config.json` names the base model under `base_model_name_or_path`.",
        "lightning_falcon/export/run.py:_base_of",
        "PEFT documents the field of `PeftConfig`, not the file it is saved in, read before any model loads.",
        "test_peft_saves_lora_weights_under_the_keys_the_checks_read",
    ),
    TouchPoint(
        "peft",
        "A second adapter added with `add_adapter` holds the same parameters as the first, named alike but for the "
        "adapter's name (`.default.` -> `.reference.`), and `set_adapter` switches which one a forward runs.",
        "lightning_falcon/model/lora.py:add_reference",
        "PEFT has no call that copies one adapter's weights into another (TRL copies them by name the same way).",
        "test_peft_keeps_a_second_adapter_beside_the_first_under_its_own_name",
    ),
    TouchPoint(
        "peft",
        "`set_peft_model_state_dict` returns the load's result, whose `missing_keys` name the LoRA weights the state "
        "lacked.",
        "lightning_falcon/model/adapter.py:load_weights",
        "Its return value is undocumented, and an adapter lacking weights must fail rather than train from zero.",
        "test_peft_reports_the_lora_weights_a_state_dict_lacks",
    ),
    TouchPoint(
        "peft",
        "`LoraLayer.get_delta_weight(adapter)` is the update PEFT's merge adds to `get_base_layer()`'s weight.",
        "lightning_falcon/export/merge.py:merge_into_dequantized",
        "PEFT merges into the base layer's weight in place; adding to a dequantized copy needs the update alone.",
        "test_peft_merge_adds_get_delta_weight_to_the_base_weight",
    ),
    TouchPoint(
        "peft",
        "`get_nb_trainable_parameters()` counts a 4-bit weight as its unpacked values, twice its bytes.",
        "lightning_falcon/model/lora.py:parameter_report",
        "`numel()` counts packed bytes, and PEFT documents the count, not how it counts quantized weights.",
        "test_peft_counts_4bit_weights_unpacked",
    ),
    TouchPoint(
        "peft",
        "`prepare_model_for_kbit_training` upcasts every unquantized 16-bit parameter to fp32, not only the norms.",
        "lightning_falcon/model/memory.py:plan",
        "PEFT documents upcasting the layer norms, and plan counts every unquantized parameter at 4 bytes.",
        "test_peft_kbit_preparation_upcasts_every_unquantized_parameter",
    ),
    # ------------------------------------------------------------- bitsandbytes
    TouchPoint(
        "bitsandbytes",
        "`Linear4bit.support_avx512bf16_for_cpu = False` stops the CPU repack of 4-bit weights on an eval forward.",
        "lightning_falcon/upstream.py:keep_4bit_layout_trainable",
        "The switch is an undocumented instance attribute, and after the repack no gradient flows through the layer.",
        "test_bitsandbytes_still_reads_the_cpu_repack_switch_the_loader_turns_off",
    ),
    TouchPoint(
        "bitsandbytes",
        "`weight.quant_state.as_dict(packed=False)` lists every constant tensor of a 4-bit weight, and `weight.SCB` "
        "holds an 8-bit weight's row scales.",
        "lightning_falcon/upstream.py:quantization_constants",
        "The constants are attributes of the weight, neither parameters nor buffers, with no documented accessor.",
        "test_bitsandbytes_keeps_a_weights_constants_beside_it_at_the_sizes_plan_counts",
    ),
    TouchPoint(
        "bitsandbytes",
        "A 4-bit layer of n weights holds n/2 bytes, one absmax per 64 weights (uint8 under double quantization, with "
        "an fp32 one per 256 blocks and a 256-entry code) and a 16-entry code.",
        "lightning_falcon/model/memory.py:quantized_layer_bytes",
        "plan counts memory without loading anything, and bitsandbytes documents the block size, not the constants.",
        "test_bitsandbytes_keeps_a_weights_constants_beside_it_at_the_sizes_plan_counts",
    ),
    TouchPoint(
        "bitsandbytes",
        "`functional.dequantize_4bit(weight.data, weight.quant_state)` is the exact weight a `Linear4bit` computes "
        "with.",
        "lightning_falcon/export/merge.py:dense_weight",
        "bitsandbytes documents the function, not that it gives the layer's own weight, and merging relies on it.",
        "test_bitsandbytes_dequantizes_a_4bit_layer_to_what_it_computes_with",
    ),
    TouchPoint(
        "bitsandbytes",
        "An 8-bit weight keeps its row scales as `weight.SCB` until the first forward moves them to `layer.state.SCB`, "
        "and `functional.int8_vectorwise_dequant(data, scales)` expands it.",
        "lightning_falcon/export/merge.py:dense_weight",
        "The scales are undocumented attributes, and where they are depends on whether the layer has run.",
        "test_bitsandbytes_int8_scales_move_to_the_layer_state_on_the_first_forward",
    ),
    # ------------------------------------------------------------- deepspeed
    TouchPoint(
        "deepspeed",
        "DeepSpeed's engine checkpoints its module through `engine.module_state_dict(...)`, wrapped to keep trainable "
        "weights only.",
        "lightning_falcon/upstream.py:keep_only_trainable_in_checkpoints",
        "`exclude_frozen_parameters` drops frozen parameters but not bitsandbytes' quantization constants, and "
        "DeepSpeed has no filter for its checkpointed state.",
        "test_deepspeed_checkpoints_the_module_state_through_module_state_dict",
    ),
    # ------------------------------------------------------------- torch
    TouchPoint(
        "torch",
        "A refused `weights_only` load names the global as `Unsupported global: GLOBAL NAME`.",
        "lightning_falcon/upstream.py:TORCH_REFUSED_GLOBAL",
        "torch gives the refused global only in the message.",
        "test_torch_still_names_the_global_a_weights_only_load_refuses",
    ),
    TouchPoint(
        "torch",
        "`torch.save` into a file whose write fails raises with that OSError, and its errno, in the error's chain.",
        "lightning_falcon/training/checkpoint_io.py:write_failed_for_space",
        "torch reports a failed write as a RuntimeError about stream positions, and a full disk must be named so.",
        "test_torch_save_keeps_a_failed_writes_oserror_in_its_chain",
    ),
    TouchPoint(
        "torch",
        "DistributedSampler shares an epoch as a `seed + epoch` permutation repeated to `total_size`, rank r taking "
        "every `num_replicas`-th from r, and keeps those values as attributes.",
        "lightning_falcon/data/sampler.py:ResumableSampler._order",
        "DistributedSampler has no hook to reorder its permutation, so the sampler restates its sharing.",
        "test_distributed_sampler_shares_an_epoch_as_the_sampler_restates_it",
    ),
    TouchPoint(
        "torch",
        "`torch.backends.cuda.SDPAParams(query, key, value, mask, dropout, is_causal, enable_gqa)` is what "
        "`can_use_flash_attention` checks.",
        "lightning_falcon/upstream.py:cuda_flash_takes",
        "`SDPAParams`' arguments are undocumented, and the check is the only way to ask without running a kernel.",
        "test_sdpa_params_still_take_the_arguments_the_flash_check_gives",
    ),
    TouchPoint(
        "torch",
        "The CPU flash kernel takes grouped heads (`enable_gqa`) with a boolean mask, and refuses only dropout.",
        "lightning_falcon/model/attention.py:gqa_is_fused",
        "torch's CPU kernel choice is undocumented, and `can_use_flash_attention` checks CUDA's only.",
        "test_cpu_flash_attention_takes_grouped_heads_with_a_mask",
    ),
    # ------------------------------------------------------------- datasets
    TouchPoint(
        "datasets",
        "A header-only file's error contains `corresponds to no data`.",
        "lightning_falcon/upstream.py:DATASETS_NO_ROWS",
        "datasets raises a generic error for a file without rows.",
        "test_datasets_still_words_a_header_only_csv_as_no_data",
    ),
    TouchPoint(
        "datasets",
        "`train_test_split(test_size=f)` holds out ceil(f x n) of n rows.",
        "lightning_falcon/data/datamodule.py:PromptDataModule._prepare",
        "datasets documents the fraction, not its rounding, and a split that leaves nothing to train is refused first.",
        "test_datasets_holds_out_the_rows_the_datamodule_counts",
    ),
    # ------------------------------------------------------------- jsonargparse
    TouchPoint(
        "jsonargparse",
        "`parser._actions` (argparse's) lists every key a parser accepts.",
        "lightning_falcon/upstream.py:parser_keys",
        "argparse keeps its actions private, and the nearest valid key is suggested from them.",
        "test_jsonargparse_error_texts_and_parser_actions",
    ),
    TouchPoint(
        "jsonargparse",
        "An unknown key's error reads `does not accept option 'KEY'` or `unrecognized arguments: KEY`.",
        "lightning_falcon/upstream.py:JSONARGPARSE_UNKNOWN_KEY",
        "jsonargparse reports parse errors as text only.",
        "test_jsonargparse_error_texts_and_parser_actions",
    ),
    TouchPoint(
        "jsonargparse",
        'A bad value\'s error reads `Parser key "KEY": PROBLEM`.',
        "lightning_falcon/upstream.py:JSONARGPARSE_BAD_VALUE",
        "jsonargparse reports parse errors as text only.",
        "test_jsonargparse_error_texts_and_parser_actions",
    ),
    TouchPoint(
        "jsonargparse",
        "An unknown key of a config file's section reads `Group 'SECTION' does not accept option 'KEY'`.",
        "lightning_falcon/upstream.py:JSONARGPARSE_GROUP",
        "jsonargparse reports parse errors as text only, and names a config file's key without its section.",
        "test_jsonargparse_names_the_section_of_a_config_files_unknown_key",
    ),
    TouchPoint(
        "jsonargparse",
        "`ArgumentParser.error(message, ex)` is overridden, and jsonargparse catches what it raises when "
        "`exit_on_error` is off or `JSONARGPARSE_DEBUG` is set.",
        "lightning_falcon/upstream.py:jsonargparse_recovers",
        "jsonargparse has no documented hook to print a parse error differently.",
        "test_jsonargparse_error_hook_still_takes_the_error_and_marks_subcommand_errors",
    ),
    TouchPoint(
        "jsonargparse",
        "An error inside a subcommand carries that subcommand's parser as `subcommand_parser`.",
        "lightning_falcon/upstream.py:failing_parser",
        "jsonargparse marks it with an undocumented attribute, and its keys are the ones to suggest.",
        "test_jsonargparse_error_hook_still_takes_the_error_and_marks_subcommand_errors",
    ),
    TouchPoint(
        "jsonargparse",
        "A subcommand's parser is named `PROGRAM [options] SUBCOMMAND`.",
        "lightning_falcon/commands/cli.py:explain_parse_error",
        "jsonargparse has no documented way to ask which subcommand a parser belongs to, which the fix's help names.",
        "test_jsonargparse_names_a_subcommand_parser_after_its_subcommand",
    ),
    # ------------------------------------------------------------- gguf and tokenizers
    TouchPoint(
        "gguf",
        "GGUFWriter's low-level calls, `add_tensor_info` for every tensor, `write_header_to_file`, "
        "`write_kv_data_to_file`, `write_ti_data_to_file`, then `write_tensor_data` for each, write a whole file.",
        "lightning_falcon/export/gguf.py:write",
        "gguf's documented path, `add_tensor` then `write_tensors_to_file`, holds every converted tensor in memory.",
        "test_gguf_low_level_writer_streams_a_file_that_reads_back",
    ),
    TouchPoint(
        "gguf",
        "`gguf.quants.quantize(data, Q8_0)` gives the bytes of `quant_shape_to_byte_shape(shape, Q8_0)`.",
        "lightning_falcon/export/gguf.py:_encoded",
        "gguf's `quants` module is undocumented, and the header lists each tensor's bytes before any is converted.",
        "test_gguf_low_level_writer_streams_a_file_that_reads_back",
    ),
    TouchPoint(
        "gguf",
        "llama.cpp's names for Falcon's tensors (`token_embd`, `blk.N.attn_qkv`, ...), as gguf lists them for "
        "`MODEL_ARCH.FALCON`, are written as literals.",
        "lightning_falcon/export/gguf_falcon.py:tensors",
        "The names are llama.cpp's conventions, which its loader looks up by name.",
        "test_gguf_still_names_falcons_tensors_as_the_writer_does",
    ),
    TouchPoint(
        "tokenizers",
        "A serialized tokenizer's JSON holds `model.type`, `model.merges` (strings or pairs) and `pre_tokenizer` (a "
        "`Sequence` of `pretokenizers`).",
        "lightning_falcon/export/gguf.py:pre_tokenizer",
        "tokenizers documents `to_str`, not the layout it writes, from which llama.cpp's pre-tokenizer is named.",
        "test_tokenizers_serializes_a_bpe_tokenizer_as_the_gguf_writer_reads_it",
    ),
    # ------------------------------------------------------------- the console's silenced notices
    TouchPoint(
        "transformers",
        "The texts of transformers' gradient-checkpointing deprecations, silenced by the console.",
        "lightning_falcon/commands/console.py:WARNINGS",
        "The warnings are about a call inside PEFT, with no category or switch of their own but the text.",
        "test_the_console_still_silences_texts_the_libraries_emit",
    ),
    TouchPoint(
        "torch",
        "The text of torch's pytree `LeafSpec` deprecation that Lightning triggers, silenced by the console.",
        "lightning_falcon/commands/console.py:WARNINGS",
        "The warning is about a call inside Lightning, with no category or switch of its own but the text.",
        "test_the_console_still_silences_texts_the_libraries_emit",
    ),
    TouchPoint(
        "lightning",
        "The text of Lightning's `💡 Tip:` advertisement and the logger it goes to, silenced by the console.",
        "lightning_falcon/commands/console.py:RECORDS",
        "Lightning logs it at INFO beside its useful lines, with no switch but the text.",
        "test_the_console_still_silences_texts_the_libraries_emit",
    ),
    TouchPoint(
        "bitsandbytes",
        "The text of bitsandbytes' failed optional CPU kernel download and the logger it goes to, silenced by the "
        "console.",
        "lightning_falcon/commands/console.py:RECORDS",
        "bitsandbytes warns about an optional extra it then does without, with no switch but the text.",
        "test_the_console_still_silences_texts_the_libraries_emit",
    ),
)
