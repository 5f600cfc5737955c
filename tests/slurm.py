"""The real one-node SLURM cluster of tools/slurm_cluster.sh, as a session fixture: used when it answers, else skipped.

CI starts the cluster before pytest (.ci/run); locally `tools/slurm_cluster.sh start` does. The tests never
install or start it themselves unless IMGCLS_TEST_START_SLURM=1 asks (apt and five daemons are not a
side effect a test run should have). The cluster is found through SLURM_CONF, or, when that is unset, the
config the script writes (IMGCLS_SLURM_DIR, default /tmp/imgcls-slurm); IMGCLS_TEST_SLURM_REQUIRED=1
(set by .ci/run once the cluster started) turns a skip into a failure, so a cluster that dies mid-run
cannot pass CI by skipping its tests."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm_cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path  # slurm.conf: every SLURM command of the test session reads it through SLURM_CONF
    partition: str  # the default partition, where the node is
    node: str

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM command (sacct, scancel, squeue...) against this cluster."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)

    def job_state(self, job_id: str) -> str:
        """The job's state as the accounting has it (`sacct -X`), e.g. COMPLETED, CANCELLED by 0."""
        out = self.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").stdout.split("\n")
        return out[0].strip()


def _cluster_dir() -> Path:
    return Path(os.environ.get("IMGCLS_SLURM_DIR", "/tmp/imgcls-slurm"))


def _conf() -> Path:
    return Path(os.environ.get("SLURM_CONF") or _cluster_dir() / "slurm.conf")


def _why_not(conf: Path) -> tuple[str | None, SlurmCluster | None]:
    """(why there is no usable cluster, None) or (None, the cluster)."""
    if not shutil.which("sinfo"):
        return "SLURM is not installed (no sinfo)", None
    if not conf.is_file():
        return f"no SLURM config at {conf} (SLURM_CONF)", None
    env = {**os.environ, "SLURM_CONF": str(conf)}

    def ask(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)

    try:
        nodes = ask("sinfo", "-h", "-N", "-o", "%P %N %t")
        # the fault handling tells a cancelled job from a failed one through sacct: no accounting, no cluster
        acct = ask("sacct", "-n", "-X", "-o", "JobID", "-S", "now-1minutes")
    except subprocess.TimeoutExpired as exc:
        return f"`{' '.join(exc.cmd)}` did not answer in 30 s", None
    if nodes.returncode:
        return f"sinfo failed: {nodes.stderr.strip()[-300:]}", None
    if acct.returncode:
        return f"sacct failed (the cluster needs slurmdbd accounting): {acct.stderr.strip()[-300:]}", None
    # a node busy with another test worker's jobs counts: its jobs queue; one down, drained or not
    # responding (a `*` suffix) does not
    up = ("idle", "mix", "alloc", "comp")
    rows = [line.split() for line in nodes.stdout.splitlines()]
    ready = [row for row in rows if len(row) == 3 and row[2] in up]
    if not ready:
        return f"no node up in sinfo: {nodes.stdout.strip()!r}", None
    default = [r for r in ready if r[0].endswith("*")] or ready
    partition, node, _ = default[0]
    return None, SlurmCluster(conf=conf, partition=partition.rstrip("*"), node=node)


def _start(conf: Path) -> None:
    """tools/slurm_cluster.sh start, when asked to: the cluster in the folder of `conf`."""
    result = subprocess.run(
        [str(SCRIPT), "start", str(conf.parent)], capture_output=True, text=True, timeout=900
    )
    if result.returncode:
        pytest.fail(f"tools/slurm_cluster.sh start failed:\n{result.stderr[-3000:]}")


def slurm_cluster_session():
    """The fixture's body (conftest.py's `slurm_cluster`): the cluster with SLURM_CONF set for the session,
    so submitit's sbatch/sacct/scancel and the jobs it submits (sbatch passes the environment on) reach it."""
    conf = _conf()
    started = False
    why, cluster = _why_not(conf)
    if why and os.environ.get("IMGCLS_TEST_START_SLURM") == "1":
        _start(conf)
        # under pytest-xdist each worker runs this fixture and the first to finish would stop the cluster
        # under the others: there it stays up (tools/slurm_cluster.sh stop ends it)
        started = not os.environ.get("PYTEST_XDIST_WORKER")
        why, cluster = _why_not(conf)
    if why:
        message = f"no SLURM cluster: {why}; start one with `tools/slurm_cluster.sh start`"
        if os.environ.get("IMGCLS_TEST_SLURM_REQUIRED") == "1":
            pytest.fail(message + " (IMGCLS_TEST_SLURM_REQUIRED=1)")
        pytest.skip(message)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(conf))
            yield cluster
    finally:
        if started:  # leave the machine as the session found it
            subprocess.run([str(SCRIPT), "stop", str(conf.parent)], capture_output=True, timeout=300)


@contextmanager
def one_test_at_a_time(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster for one test alone: pytest-xdist runs tests side by side, and two sweeps sharing
    the node's two CPUs queue each other's jobs (a test that counts its jobs or times them would see
    the other's). An flock beside the cluster's config waits for the test that holds it."""
    with open(Path(cluster.conf).parent / "tests.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cluster
