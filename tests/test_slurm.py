"""The shipped sbatch scripts against a real Slurm (slurmctld + slurmd + munge on localhost, see
slurm_cluster.py): a 2-task CPU DDP job completes, a signalled job saves, requeues and resumes, and
bad input stops the job before srun. Skips, with the reason, where Slurm cannot be installed or started.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PLANTED_TOKEN, REPO, files_holding_the_token, scalars
from slurm_cluster import LocalSlurm, install

# The scripts ask for 8 GPUs; this node has 2 CPUs and no GPUs (slurm/README.md, "A CPU-only Slurm").
CPU_ALLOCATION = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    problem = install()
    if problem:
        pytest.skip(problem)
    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
        pytest.skip(f"Slurm did not start: {e}")
    yield cluster
    # A failed test may leave its job running: cancel every job before the daemons go.
    subprocess.run(["scancel", "--partition=debug"], env=cluster.env, capture_output=True, check=False)
    time.sleep(2)
    cluster.stop()


class Job:
    """A job submitted with one of the shipped scripts from `root`, the submit directory."""

    def __init__(
        self,
        cluster: LocalSlurm,
        root: Path,
        *args: str,
        script: str = "fit.sbatch",
        sbatch: list[str] = CPU_ALLOCATION,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cluster, self.root = cluster, root
        # The job inherits this environment (sbatch exports it): the test's Python comes first on PATH.
        self.env = {
            **cluster.env,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            # The localhost cluster's node names n1, n2 do not resolve as hosts (slurm_cluster.py).
            "MASTER_ADDR": "127.0.0.1",
        }
        for key, value in (env or {}).items():  # None removes a variable
            self.env.pop(key, None) if value is None else self.env.__setitem__(key, value)
        command = ["sbatch", "--parsable", *sbatch, str(REPO / "slurm" / script), *args]
        proc = subprocess.run(command, cwd=root, env=self.env, capture_output=True, text=True, check=True)
        self.id = proc.stdout.strip().split(";")[0]

    def run(self, *command: str) -> str:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True).stdout

    def info(self) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); completed jobs stay for MinJobAge."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", self.id)))

    def wait(self, until, what: str, timeout: float = 240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                # Slurm holds a requeued job for 120 s before it may start again; the tests skip the wait.
                self.run("scontrol", "update", f"JobId={self.id}", "StartTime=now")
            result = until()
            if result:
                return result
            time.sleep(1)
        pytest.fail(f"job {self.id}: timed out waiting for {what}; state {self.info()}\n{self.log()[-3000:]}")

    def finished(self, timeout: float = 300) -> dict[str, str]:
        def done():
            info = self.info()
            return info if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

        return self.wait(done, "the job to end", timeout)

    def log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.root.glob(f"*-{self.id}.*")))

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / "tiny" / f"slurm-{self.id}"


def tiny(root: Path, *overrides: str) -> list[str]:
    return [str(REPO / "configs/tiny.yaml"), "--data.cache_dir", str(root / "cache"), *overrides]


@pytest.mark.slow
def test_two_task_job_completes_with_adapter_scalars_and_world_size_two(slurm, tmp_path):
    overrides = ("--trainer.max_steps", "30", "--trainer.val_check_interval", "15")
    job = Job(slurm, tmp_path, *tiny(tmp_path, *overrides), env={"HF_TOKEN": PLANTED_TOKEN})
    info = job.finished()
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "[fit] world size 2 (1 node(s) x 2 device(s), DDPStrategy)" in log
    assert "LoRA weights identical on all 2 ranks" in log
    # A log is no terminal: progress comes as lines (from rank 0 alone), not as a bar drawn at the end.
    assert [line.split(" · ")[0] for line in log.splitlines() if line.startswith("[fit] step 30/")] == [
        "[fit] step 30/30 (100%)"
    ]
    assert "[val] step 15 · val/loss " in log and "Epoch 0" not in log
    assert (job.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (job.run_dir / "adapter" / "adapter_config.json").is_file()
    tags = scalars(job.run_dir)
    assert max(step for step, _ in tags["train/loss"]) >= 25 and "val/loss" in tags
    # The devices and nodes came from the allocation, not from the config (tiny.yaml leaves them to auto).
    assert "--trainer.devices=2 --trainer.num_nodes=1" in log
    # The job's environment held a Hub token: neither its Slurm logs nor any file of the run hold it.
    files, holding = files_holding_the_token(tmp_path)
    assert any(path.name.endswith(f"-{job.id}.out") for path in files) and any(
        path.suffix == ".safetensors" for path in files
    )
    assert holding == []


@pytest.mark.slow
def test_multinode_script_runs_one_task_on_each_of_two_nodes(slurm, tmp_path):
    job = Job(
        slurm,
        tmp_path,
        *tiny(tmp_path, "--trainer.max_steps", "20"),
        script="fit-multinode.sbatch",
        sbatch=["--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"],
    )
    info = job.finished()
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", log[-3000:]
    assert "terminate called" not in log  # rank 1 used to abort at exit, failing a job that had trained
    assert "--trainer.devices=1 --trainer.num_nodes=2" in log
    assert "[fit] world size 2 (2 node(s) x 1 device(s), DDPStrategy)" in log
    assert (job.run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_signalled_job_saves_requeues_and_resumes_to_the_planned_step(slurm, tmp_path):
    steps = 200
    job = Job(
        slurm, tmp_path, *tiny(tmp_path, "--trainer.max_steps", str(steps), "--checkpoint.every_n_train_steps", "25")
    )
    checkpoints = job.run_dir / "checkpoints"

    # 1. The signal Slurm sends before the time limit (--signal=SIGUSR1@90): to the job's tasks.
    job.wait(lambda: (checkpoints / "step=25.ckpt").exists(), "the first checkpoint")
    job.run("scancel", "--signal=USR1", job.id)
    job.wait(lambda: job.info()["Restarts"] == "1", "the first requeue")
    # 2. The same signal sent to the batch shell (scancel --batch, or --signal=B:USR1@90): srun forwards it.
    job.wait(lambda: (checkpoints / "step=100.ckpt").exists(), "a checkpoint after the restart", timeout=300)
    job.run("scancel", "--batch", "--signal=USR1", job.id)
    info = job.finished(timeout=400)
    log = job.log()

    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-3000:]
    saved = [int(s) for s in re.findall(r"\[slurm\] saved \S+ at step (\d+); job requeued", log)]
    resumed = [int(s) for s in re.findall(r"\[fit\] world size 2 .*; step (\d+) of 200", log)]
    assert len(saved) == 2 and 25 <= saved[0] < saved[1] < steps, log[-3000:]
    assert resumed == [0, *saved]  # each restart continued from the step its requeue saved
    # Each restart resumed from this job's own checkpoint, never the newest of any run.
    assert log.count("--ckpt_path=last") == 2
    assert log.count(f"[resume] --ckpt_path last -> runs/tiny/slurm-{job.id}/checkpoints/last.ckpt") == 2
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == steps and (checkpoints / f"step={steps}.ckpt").exists()
    assert (job.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # One run directory for the whole job: its TensorBoard events run to the planned step.
    assert max(step for step, _ in scalars(job.run_dir)["train/loss"]) >= steps - 5


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_on_the_way_out(slurm, tmp_path):
    # A preemption without the user signal, or scancel: save at the next step, exit, no requeue.
    job = Job(slurm, tmp_path, *tiny(tmp_path, "--trainer.max_steps", "400", "--checkpoint.every_n_train_steps", "20"))
    checkpoints = job.run_dir / "checkpoints"
    job.wait(lambda: (checkpoints / "step=20.ckpt").exists(), "the first checkpoint")
    job.run("scancel", "--signal=TERM", job.id)
    job.finished()
    saved = re.findall(r"\[slurm\] SIGTERM: saved \S+ at step (\d+)", job.log())
    assert saved and int(saved[0]) >= 20, job.log()[-3000:]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == int(saved[0]) and not (job.run_dir / "adapter").exists()


@pytest.mark.slow
def test_missing_config_fails_before_srun(slurm, tmp_path):
    job = Job(slurm, tmp_path, "configs/nope.yaml")
    info = job.finished()
    err = (tmp_path / f"lightning-falcon-{job.id}.err").read_text().strip()
    assert info["ExitCode"] == "2:0"
    expected = f"config file 'configs/nope.yaml' not found (relative to {tmp_path}): give a path to a YAML file"
    assert err == f"fit.sbatch: error: {expected}"
    assert "[slurm] srun" not in job.log()


@pytest.mark.slow
def test_config_contradicting_the_allocation_fails_before_srun(slurm, tmp_path):
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text("trainer:\n  devices: 4\n  num_nodes: 2\n")
    job = Job(slurm, tmp_path, *tiny(tmp_path, "--config", str(pinned)))
    info = job.finished()
    errors = [line for line in job.log().splitlines() if "error" in line.lower()]
    assert info["ExitCode"] == "2:0"
    assert len(errors) == 1, job.log()[-3000:]
    assert "trainer.devices is 4 but the allocation runs 2 task(s) per node" in errors[0]
    assert "trainer.num_nodes is 2 but the allocation has 1 node(s)" in errors[0]
    assert "[slurm] srun" not in job.log() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_unresolvable_first_node_fails_before_srun_instead_of_hanging(slurm, tmp_path):
    # Without MASTER_ADDR the ranks would meet at the first node, n1, which no resolver knows here:
    # torch's rendezvous would wait for it for 30 minutes.
    job = Job(slurm, tmp_path, *tiny(tmp_path), env={"MASTER_ADDR": None})
    info = job.finished(timeout=120)
    assert info["ExitCode"] == "2:0"
    assert "the rendezvous host n1 (the job's first node) does not resolve" in job.log()
    assert "[slurm] srun" not in job.log()


# ---------------------------------------------------------------- the allocation, without a cluster
def test_allocation_reads_slurm_environment():
    from lightning_falcon.commands.slurm_args import Allocation

    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_GPUS_PER_NODE": "h100:8",
        "SLURM_RESTART_COUNT": "1",
    }
    env["SLURM_JOB_NODELIST"] = "gpu-a[003-004]"
    assert Allocation.from_env(env) == Allocation("77", 2, [8, 8], 8, 1, "gpu-a003")
    assert Allocation.from_env({**env, "MASTER_ADDR": "10.0.0.5"}).rendezvous == "10.0.0.5"


def test_fit_arguments_follow_the_allocation_and_list_every_contradiction():
    from jsonargparse import Namespace

    from lightning_falcon.commands.slurm_args import Allocation, fit_arguments
    from lightning_falcon.errors import ConfigError

    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(version=None))
    resolved = Namespace(trainer=Namespace(accelerator="gpu", logger=logger))
    alloc = Allocation("9", 2, [8, 8], 8, 0, "localhost")
    args = fit_arguments(Namespace(trainer=Namespace(devices="auto")), resolved, alloc)
    assert args == ["--trainer.devices=8", "--trainer.num_nodes=2", "--trainer.logger.init_args.version=slurm-9"]
    with pytest.raises(ConfigError) as e:
        fit_arguments(
            Namespace(trainer=Namespace(devices=4, num_nodes=1)),
            resolved,
            Allocation("9", 2, [4, 4], 8, 0, "no-such-node.invalid"),
        )
    message = str(e.value)
    assert "\n" not in message
    assert "8 GPUs but 4 tasks per node" in message
    assert "trainer.devices is 4" not in message  # 4 devices match the 4 tasks; only the GPU count disagrees
    assert "trainer.num_nodes is 1 but the allocation has 2 node(s)" in message
    assert "rendezvous host no-such-node.invalid" in message
    with pytest.raises(ConfigError, match="has no GPUs"):
        fit_arguments(Namespace(), resolved, Allocation("9", 1, [2], 0, 0, "localhost"))


def test_slurm_args_outside_a_job_is_a_one_line_error(capsys, monkeypatch):
    from lightning_falcon.commands.main import main

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["slurm-args", "--config", str(REPO / "configs/tiny.yaml")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("lightning_falcon: error: not inside a Slurm job")


def test_a_warning_signal_before_training_is_kept_not_fatal(monkeypatch):
    import signal

    from lightning_falcon.training import preemption

    monkeypatch.setitem(preemption._received, "requeue", False)
    previous = preemption.listen()  # what the CLI does first under Slurm, before the model loads
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # SIGUSR1's default action would end this process
        assert preemption._received["requeue"]  # the first optimizer step then saves and requeues
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_slurm_args_pass_a_users_ckpt_path_through(capsys, monkeypatch):
    from lightning_falcon.commands.main import main

    for key, value in {"SLURM_JOB_ID": "5", "SLURM_TASKS_PER_NODE": "1", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    main(["slurm-args", "--config", str(REPO / "configs/tiny.yaml"), "--ckpt_path", "runs/old/last.ckpt"])
    args = capsys.readouterr().out.split()
    assert args == ["--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.logger.init_args.version=slurm-5"]
