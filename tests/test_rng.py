"""`training.rng.RNGState`: after a resume each rank draws what it would have drawn had the run not stopped.

No GPU and no process group: each rank is simulated in this process (`Rank`), with its own generators, a
stand-in for torch.cuda whose devices are CPU `torch.Generator`s, and `rng.gather_from_ranks` replaced by
a list the ranks fill in turn.
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only

from lightning_falcon.training import rng
from lightning_falcon.training.rng import RNGState


class Rank:
    """One rank's process: its CPU generators, and `devices` visible GPUs whose generators it seeded alike
    (as `seed_everything` does); it trains on cuda:`device`, so that is the only one its draws advance."""

    def __init__(self, rank: int, world_size: int, devices: int, seed: int = 0, device: int | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = rank if device is None else device
        self.cuda = [torch.Generator().manual_seed(seed) for _ in range(devices)]
        self._cpu = (
            torch.Generator().manual_seed(seed).get_state(),
            np.random.RandomState(seed).get_state(),
            random.Random(seed).getstate(),
        )

    @contextmanager
    def running(self) -> Iterator[None]:
        """Run the block as this rank: the process's generators and torch.cuda are this rank's."""
        torch.set_rng_state(self._cpu[0])
        np.random.set_state(self._cpu[1])
        random.setstate(self._cpu[2])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda, "get_rng_state", lambda device: self.cuda[device.index].get_state())
            patch.setattr(torch.cuda, "set_rng_state", lambda state, device: self.cuda[device.index].set_state(state))
            patch.setattr(rank_zero_only, "rank", self.rank)  # only rank 0 warns
            yield
        self._cpu = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    @property
    def trainer(self) -> SimpleNamespace:
        """The parts of this rank's Trainer that RNGState reads: its rank, the world size and its device."""
        device = torch.device("cuda", self.device) if self.cuda else torch.device("cpu")
        return SimpleNamespace(
            global_rank=self.rank, world_size=self.world_size, strategy=SimpleNamespace(root_device=device)
        )

    def draw(self) -> list[float]:
        """What a training step draws: dropout on the GPU (or CPU), and shuffles from NumPy and Python."""
        with self.running():
            drawn = torch.rand(2).tolist() + np.random.rand(2).tolist() + [random.random()]
            if self.cuda:
                drawn += torch.rand(2, generator=self.cuda[self.device]).tolist()
            return drawn


@pytest.fixture(autouse=True)
def _keep_process_generators() -> Iterator[None]:
    # The simulated ranks set this process's generators; the tests after these keep their own.
    with torch.random.fork_rng(devices=[]):
        numpy_state, python_state = np.random.get_state(), random.getstate()
        yield
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def train(ranks: list[Rank]) -> None:
    """Steps that advance each rank's generators by a different amount, as batches padded to different lengths do."""
    for rank in ranks:
        for _ in range(1 + 3 * rank.rank):
            rank.draw()


def save(ranks: list[Rank], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The RNGState entry of the checkpoint that `ranks` save together, as written to disk and read back."""
    gathered: list[dict[str, Any]] = []

    def gather(own: dict[str, Any]) -> list[dict[str, Any]]:
        # all_gather_object hands every rank the same list; here the ranks call in turn, and the list is
        # whole once the last one has added its own.
        gathered.append(own)
        return gathered

    monkeypatch.setattr(rng, "gather_from_ranks", gather)
    states = []
    for rank in ranks:
        with rank.running():
            callback = RNGState()
            callback.setup(rank.trainer, None, "fit")
            states.append(callback.state_dict())
    return written_and_read(states[0])  # rank 0 writes


def written_and_read(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resume(ranks: list[Rank], state: dict[str, Any]) -> list[str]:
    """Restore `state` on every rank as a resumed fit does; the warnings they gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rank in ranks:
            with rank.running():
                callback = RNGState()
                callback.load_state_dict(state)
                callback.on_train_start(rank.trainer, None)
    return [str(warning.message) for warning in caught]


def rank_zero_layout(rank: Rank) -> dict[str, Any]:
    """A checkpoint's entry in the older layout: rank 0's CPU generators and every GPU's as its process saw them."""
    with rank.running():
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate(),
        }
    if rank.cuda:
        state["cuda"] = [generator.get_state() for generator in rank.cuda]
    return written_and_read(state)


@pytest.mark.parametrize("devices", [2, 0], ids=["cuda", "cpu"])  # an id "gpu" would read as the gpu marker
def test_each_rank_draws_after_resume_what_it_would_have_drawn(monkeypatch, devices):
    ranks = [Rank(r, world_size=2, devices=devices) for r in range(2)]
    train(ranks)
    saved = save(ranks, monkeypatch)
    uninterrupted = [rank.draw() for rank in ranks]

    resumed = [Rank(r, world_size=2, devices=devices, seed=1) for r in range(2)]
    assert resume(resumed, saved) == []
    assert [rank.draw() for rank in resumed] == uninterrupted


def test_fewer_ranks_and_gpus_resume_from_their_own_ranks_generators(monkeypatch):
    ranks = [Rank(r, world_size=2, devices=2) for r in range(2)]
    train(ranks)
    saved = save(ranks, monkeypatch)
    uninterrupted = ranks[0].draw()

    alone = Rank(0, world_size=1, devices=1, seed=1)
    warned = resume([alone], saved)
    assert alone.draw() == uninterrupted
    assert len(warned) == 1 and "not bit-exact" in warned[0] and "written by 2 rank(s)" in warned[0]


def test_more_ranks_and_gpus_take_the_generators_of_a_saved_rank(monkeypatch):
    single = Rank(0, world_size=1, devices=1)
    train([single])
    saved = save([single], monkeypatch)
    uninterrupted = single.draw()

    resumed = [Rank(r, world_size=4, devices=4, seed=1) for r in range(4)]
    warned = resume(resumed, saved)
    assert resumed[3].draw() == uninterrupted  # rank 3 on cuda:3 continues from rank 0's generators
    assert len(warned) == 1 and "not bit-exact" in warned[0] and "rank r % 1" in warned[0]


def test_a_gpu_checkpoint_resumes_without_a_gpu_and_a_cpu_one_with_a_gpu(monkeypatch):
    on_gpu = Rank(0, world_size=1, devices=1)
    train([on_gpu])
    saved = save([on_gpu], monkeypatch)
    uninterrupted_cpu = on_gpu.draw()[:5]  # the CPU, NumPy and Python draws
    without_gpu = Rank(0, world_size=1, devices=0, seed=1)
    warned = resume([without_gpu], saved)
    assert without_gpu.draw() == uninterrupted_cpu
    assert len(warned) == 1 and "this run is on the CPU" in warned[0]

    on_cpu = Rank(0, world_size=1, devices=0)
    saved = save([on_cpu], monkeypatch)
    warned = resume([Rank(0, world_size=1, devices=1, seed=1)], saved)
    assert len(warned) == 1 and "written without a GPU" in warned[0]


def test_a_checkpoint_in_the_older_layout_resumes_exactly_on_one_gpu():
    single = Rank(0, world_size=1, devices=2)  # the old layout saved both visible GPUs' generators
    train([single])
    saved = rank_zero_layout(single)
    uninterrupted = single.draw()

    resumed = Rank(0, world_size=1, devices=2, seed=1)
    assert resume([resumed], saved) == []
    assert resumed.draw() == uninterrupted


def test_a_checkpoint_in_the_older_layout_resumes_on_two_ranks_and_on_another_gpu():
    ranks = [Rank(r, world_size=2, devices=2) for r in range(2)]
    train(ranks)
    saved = rank_zero_layout(ranks[0])
    uninterrupted = ranks[0].draw()

    resumed = [Rank(r, world_size=2, devices=2, seed=1) for r in range(2)]
    warned = resume(resumed, saved)
    assert resumed[0].draw() == uninterrupted
    assert len(warned) == 1 and "rank 0's generators only" in warned[0]

    on_second_gpu = Rank(0, world_size=1, devices=2, device=1, seed=1)  # fit with devices=[1]
    warned = resume([on_second_gpu], rank_zero_layout(Rank(0, world_size=1, devices=1)))
    assert len(warned) == 1 and "no CUDA generator for cuda:1" in warned[0]


def test_a_cpu_run_on_a_gpu_machine_leaves_cuda_alone(monkeypatch):
    """The generators saved are those of the strategy's device: a CPU run opens no CUDA context, even where
    CUDA is there."""

    def untouchable(*args, **kwargs):
        raise AssertionError("a CPU run asked torch.cuda for a generator")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", untouchable)
    monkeypatch.setattr(torch.cuda, "set_rng_state", untouchable)
    monkeypatch.setattr(rng, "gather_from_ranks", lambda own: [own])
    cpu = SimpleNamespace(global_rank=0, world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    callback = RNGState()
    callback.setup(cpu, None, "fit")
    state = written_and_read(callback.state_dict())
    assert "cuda" not in state["ranks"][0]
    callback.load_state_dict(state)
    callback.on_train_start(cpu, None)
