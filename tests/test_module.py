"""FalconQLoRA builds a 4-bit base with LoRA where only the adapters train, and refuses bad settings early."""

import pytest
import torch
from helpers import TINY

from lightning_falcon import FalconQLoRA
from lightning_falcon.errors import ConfigError
from lightning_falcon.model.step_policy import lr_factor


@pytest.fixture(scope="module")
def module():
    m = FalconQLoRA(model_name_or_path=TINY, lora_r=4)
    m.configure_model()
    return m


def test_only_lora_parameters_train(module):
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every targeted projection of every block got an adapter pair
    assert len(trainable) == 2 * 4 * module.model.config.num_hidden_layers
    assert module.report.quantized_layers == 4 * module.model.config.num_hidden_layers
    assert 0 < module.report.trainable < module.report.total


def test_model_starts_fit_in_train_mode_so_dropout_is_active():
    m = FalconQLoRA(model_name_or_path=TINY, lora_dropout=0.1)
    m.configure_model()
    in_eval = [n for n, sub in m.model.named_modules() if not sub.training]
    assert in_eval == []


def test_configure_model_is_idempotent(module):
    model = module.model
    module.configure_model()
    assert module.model is model


def test_one_training_step_moves_only_lora_weights(module):
    module.train()
    # .data, not .detach(): Params4bit.detach() reports the unpacked shape of its packed storage
    before = {n: p.data.clone() for n, p in module.named_parameters()}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, module.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = module(ids, torch.ones_like(ids), ids).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.data)}
    assert changed and all(".lora_" in n for n in changed)
    # B starts at zero; after one step it moved, so the adapter now changes the output
    assert any(".lora_B." in n for n in changed)


def test_missing_target_module_lists_what_the_model_has():
    m = FalconQLoRA(model_name_or_path=TINY, target_modules=["q_proj", "dense"])
    with pytest.raises(ConfigError) as e:
        m.configure_model()
    msg = str(e.value)
    assert "['q_proj']" in msg and "query_key_value" in msg and "dense_4h_to_h" in msg
    assert m.model is None  # failed before loading any weights


def test_bad_settings_are_all_listed_at_once():
    with pytest.raises(ConfigError) as e:
        FalconQLoRA(model_name_or_path=TINY, lora_r=0, lora_dropout=1.5, learning_rate=-1)
    assert str(e.value).count(";") == 2


def test_checkpoint_holds_only_lora_weights_and_refuses_other_shapes(module):
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # its own checkpoint is accepted

    other = FalconQLoRA(model_name_or_path=TINY, lora_r=8)
    other.configure_model()
    with pytest.raises(ConfigError, match="shape mismatch"):
        other.on_load_checkpoint(checkpoint)


def test_lr_schedule_warms_up_then_decays():
    f = lr_factor(warmup_steps=10, total_steps=110, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(150) == pytest.approx(0.1)  # past the planned total (a larger max_steps on resume): the floor holds
    assert lr_factor(5, 100, "constant", 0.0)(50) == 1.0


def test_int8_base_trains_lora():
    m = FalconQLoRA(model_name_or_path=TINY, quantization="int8")
    m.configure_model()
    m.train()
    assert m.report.quantized_layers == 4 * m.model.config.num_hidden_layers
    ids = torch.randint(0, m.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    m(ids, torch.ones_like(ids), ids).loss.backward()
    lora_a = [p for n, p in m.named_parameters() if ".lora_A." in n]
    # lora_B starts at zero, so A's gradient is zero on the first step; B's must not be
    lora_b = [p for n, p in m.named_parameters() if ".lora_B." in n]
    assert lora_a and all(p.grad is not None for p in lora_a)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_gradient_checkpointing_turns_the_kv_cache_off_and_still_trains():
    m = FalconQLoRA(model_name_or_path=TINY, gradient_checkpointing=True)
    m.configure_model()
    m.train()
    assert m.model.base_model.model.is_gradient_checkpointing and m.model.config.use_cache is False
    ids = torch.randint(0, m.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    m(ids, torch.ones_like(ids), ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if ".lora_B." in n)


def test_random_init_builds_from_config_through_the_quantized_loader(tmp_path):
    m = FalconQLoRA(model_name_or_path=TINY, random_init=True, random_init_dir=str(tmp_path))
    m.configure_model()
    assert m.report.quantized_layers == 4 * m.model.config.num_hidden_layers
    (checkpoint,) = tmp_path.iterdir()
    assert (checkpoint / "model.safetensors").is_file()
    written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    again = FalconQLoRA(model_name_or_path=TINY, random_init=True, random_init_dir=str(tmp_path))
    again.configure_model()  # the same architecture reuses its checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == written


def test_random_init_checkpoint_is_written_in_prepare_data_once_per_node(tmp_path):
    # Lightning runs prepare_data on local rank 0 only; configure_model (every rank) must then only read it.
    m = FalconQLoRA(model_name_or_path=TINY, random_init=True, random_init_dir=str(tmp_path))
    m.prepare_data()
    (checkpoint,) = tmp_path.iterdir()
    written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    m.configure_model()
    assert m.report.quantized_layers == 4 * m.model.config.num_hidden_layers
    assert list(tmp_path.iterdir()) == [checkpoint]
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == written


@pytest.mark.parametrize("name", ["asset:falcon-7b", "asset:falcon-40b"])
def test_default_targets_exist_in_the_real_falcon_architectures(name):
    # A weightless skeleton from config.json: no download, no memory.
    FalconQLoRA(model_name_or_path=name).check_targets()
    with pytest.raises(ConfigError, match="query_key_value"):
        FalconQLoRA(model_name_or_path=name, target_modules=["c_attn"]).check_targets()


def test_remote_code_is_off_by_default_and_warned_about_when_on(recwarn):
    FalconQLoRA(model_name_or_path=TINY).check_targets()
    assert not [w for w in recwarn if "trust_remote_code" in str(w.message)]
    assert FalconQLoRA(model_name_or_path=TINY).hparams.trust_remote_code is False
    with pytest.warns(UserWarning, match=f"trust_remote_code is on: Python code shipped with {TINY} will run"):
        FalconQLoRA(model_name_or_path=TINY, trust_remote_code=True).check_targets()


def _fit_lora_weights(tmp_path, steps: int, module: dict | None = None, **trainer_kwargs):
    """LoRA weights after `steps` steps of a seeded fit (`module`: FalconQLoRA settings), and its optimizer."""
    import lightning as L
    from helpers import prepared_datamodule

    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs,
    )  # fmt: skip
    module = FalconQLoRA(TINY, lora_r=4, **(module or {}))
    trainer.fit(module, datamodule=prepared_datamodule(tmp_path, batch_size=4, max_samples=24))
    weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return weights, trainer.optimizers[0]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fit_clips_gradients_exactly_as_torch_does(tmp_path, algorithm):
    # The module clips by the norm it already computed for its checks (one pass fewer than Lightning's
    # own clipping); the gradients the optimizer then sees must be what torch's clipping gives.
    import lightning as L

    clip = 1e-3  # far below the tiny model's gradient norm, so every step is clipped

    class Probe(L.Callback):
        def __init__(self):
            self.pairs, self.expected = [], None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # callbacks run before the module
            copies = [torch.nn.Parameter(p.detach().clone()) for p in self.params(optimizer)]
            for c, p in zip(copies, self.params(optimizer), strict=False):
                c.grad = p.grad.detach().clone()
            if algorithm == "norm":
                assert float(torch.nn.utils.clip_grad_norm_(copies, clip)) > clip
            else:
                torch.nn.utils.clip_grad_value_(copies, clip)
            self.expected = [c.grad for c in copies]

        # The gradients the last step's optimizer used are still there when the next step zeroes them
        # (and when training ends).
        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            if self.expected is not None:
                self.pairs.append((self.expected, [p.grad.detach().clone() for p in self.params(optimizer)]))
                self.expected = None

        def on_train_end(self, trainer, pl_module):
            self.on_before_zero_grad(trainer, pl_module, trainer.optimizers[0])

        @staticmethod
        def params(optimizer):
            return [p for g in optimizer.param_groups for p in g["params"]]

    probe = Probe()
    _fit_lora_weights(tmp_path, 3, callbacks=[probe], gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    assert len(probe.pairs) == 3
    for expected, seen in probe.pairs:
        assert all(torch.equal(e, s) for e, s in zip(expected, seen, strict=False))


def test_adamw_is_fused_by_default_and_makes_torchs_update(tmp_path):
    # One kernel for all LoRA tensors instead of a loop over them (BENCHMARKS.md); the update is the same.
    fused, fused_opt = _fit_lora_weights(tmp_path / "fused", 3, gradient_clip_val=1.0)
    plain, plain_opt = _fit_lora_weights(tmp_path / "plain", 3, gradient_clip_val=1.0, module={"fused_adamw": False})
    assert fused_opt.param_groups[0]["fused"] is True and not plain_opt.param_groups[0]["fused"]
    assert any(".lora_B." in n and bool(p.abs().sum() > 0) for n, p in fused.items())  # B starts at 0: it trained
    torch.testing.assert_close(fused, plain)


@pytest.mark.parametrize(
    ("precision", "algorithm", "fused"),
    [("32-true", "norm", True), ("bf16-mixed", "norm", True), ("bf16-mixed", "value", False)],
)
def test_fit_runs_with_clipping_in_every_precision_and_fuses_adamw_where_it_can(tmp_path, precision, algorithm, fused):
    # Lightning's mixed precision refuses to clip for a fused optimizer (it unscales inside its step); the module
    # clips by norm itself, so only value clipping under mixed precision falls back to the unfused AdamW.
    _, opt = _fit_lora_weights(
        tmp_path, 2, precision=precision, gradient_clip_val=1.0, gradient_clip_algorithm=algorithm
    )
    assert bool(opt.param_groups[0]["fused"]) is fused


def test_fp16_amp_keeps_adamw_unfused_so_checks_and_clipping_see_unscaled_gradients():
    # A GradScaler (fp16 AMP, CUDA) with a fused AdamW: Lightning would skip unscaling before the module's
    # NaN guard and clipping. The plugin is real; CPU has no fp16 AMP, so it is only asked, not trained.
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    from lightning_falcon.model.step_policy import fused_adamw_fits

    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert not fused_adamw_fits(L.Trainer(accelerator="cpu", logger=False, plugins=[amp], gradient_clip_val=1.0))
    assert fused_adamw_fits(L.Trainer(accelerator="cpu", logger=False, precision="bf16-mixed", gradient_clip_val=1.0))
