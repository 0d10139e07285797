"""A Slurm cluster on localhost for the tests: Debian's slurmctld, slurmd and munge.

`LocalSlurm(root, nodes=2).start()` writes a slurm.conf under `root`, starts munged, slurmctld and one
slurmd per node (`slurmd -N n1`, each on its own port, all on this machine), and waits for the nodes
to be idle; `stop()` kills them by the pids in their pid files. The nodes n1, n2... do not resolve
as host names, so multi-node jobs need MASTER_ADDR=127.0.0.1. Without cgroups (containers), slurmd
needs proctrack/linuxproc and task/none.

    python tests/slurm_cluster.py /tmp/slurm     # start one by hand; prints the SLURM_CONF to export
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def install() -> str | None:
    """apt-get Debian's slurm-wlm and munge when they are missing; returns why Slurm cannot run, or None."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing_binaries())} missing) and apt-get as root is not available"
    proc = subprocess.run(
        "apt-get install -y slurm-wlm munge || (apt-get update && apt-get install -y slurm-wlm munge)",
        shell=True,
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus or os.cpu_count() or 2  # per node: they share this machine's cores
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        for sub in ("state", "log", "run", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        node_lines = "".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN\n"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""ClusterName=lftest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=10
InactiveLimit=0
MinJobAge=3600
JobCompType=jobcomp/none
{node_lines}PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _munge(self) -> None:
        key = self.root / "munge" / "munge.key"  # the cluster's own key: /etc/munge is left alone
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        pidfile = self.root / "run/munged.pid"
        subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--pid-file={pidfile}",
                f"--socket={self.root / 'munge/munge.socket'}",
                f"--log-file={self.root / 'log/munged.log'}",
                f"--seed-file={self.root / 'munge/munge.seed'}",
            ],
            check=True,
            capture_output=True,
        )
        # Slurm's munge plugin finds the daemon through this socket path, set in slurm.conf below.
        with self.conf.open("a") as f:
            f.write(f"AuthInfo=socket={self.root / 'munge/munge.socket'}\n")

    def start(self, timeout: float = 60) -> LocalSlurm:
        self._write_conf()
        self._munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True, capture_output=True)
        for node in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], env=self.env, check=True, capture_output=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            sinfo = ["sinfo", "-h", "-N", "-o", "%T"]
            out = subprocess.run(sinfo, env=self.env, capture_output=True, text=True, check=False).stdout
            if out.split() == ["idle"] * len(self.nodes):
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the Slurm nodes did not become idle in {timeout:.0f} s; see {self.root / 'log'}")

    def stop(self) -> None:
        for name in (*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"):
            pidfile = self.root / "run" / f"{name}.pid"
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        time.sleep(1)


if __name__ == "__main__":
    problem = install()
    if problem:
        sys.exit(problem)
    cluster = LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm")).start()
    print(f"export SLURM_CONF={cluster.conf}")
