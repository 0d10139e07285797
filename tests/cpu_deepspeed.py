"""Real DeepSpeed on CPU processes (gloo), for tests only: `QLoRADeepSpeedStrategy` minus Lightning's CUDA gate.

Lightning refuses DeepSpeed on a non-CUDA accelerator and hands DeepSpeed the device index, which a CPU
device lacks. DeepSpeed itself runs on CPU (`DS_ACCELERATOR=cpu`, gloo collectives), so these three
overrides let the tests run the product's ZeRO-2/3 path for real: partitioning, gathering, sharded
checkpoints and resume. Everything else is the shipped strategy. Used by name from the CLI:
`--trainer.strategy.class_path cpu_deepspeed.CPUDeepSpeedStrategy` with `tests/` on PYTHONPATH.
"""

import argparse

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from lightning_falcon.training.strategy import QLoRADeepSpeedStrategy


class CPUDeepSpeedStrategy(QLoRADeepSpeedStrategy):
    def supports_accelerator(self) -> bool:
        return True  # the CUDA gate is what this class removes (setup_environment below)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "CUDA only" check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # skips the device-index check: CPU devices have no index

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=-1),  # CPU: no device index
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def init_deepspeed(self) -> None:
        super().init_deepspeed()
        import bitsandbytes as bnb

        local = full = 0
        for p in self.deepspeed_engine.module.parameters():
            if isinstance(p, bnb.nn.Params4bit):
                full += getattr(p, "ds_numel", p.numel())
                local += p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else p.numel()
        print(f"[shards] rank {self.global_rank}: 4-bit storage {local} of {full} elements", flush=True)
        rank_zero_info(f"[shards] world size {self.world_size}")


class OneLoadAtATime(CPUDeepSpeedStrategy):
    """`CPUDeepSpeedStrategy` with the ranks loading the base one after another. bitsandbytes' CPU quantizer holds
    about 14 bytes a weight of the matrix it quantizes (12 GiB for a 180B MLP matrix): two ranks quantizing at once
    would not fit a 24 GB machine. Each rank still loads the whole base and DeepSpeed then shards it, as on GPUs.
    Used by class path (`cpu_deepspeed.OneLoadAtATime`, with tests/ on PYTHONPATH)."""

    def prepare_quantized_load(self):
        for _ in range(self.global_rank):  # barrier k lets rank k load once ranks 0..k-1 have
            self.barrier("one load at a time")
        return super().prepare_quantized_load()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        for _ in range(self.world_size - 1 - self.global_rank):
            self.barrier("one load at a time")
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
