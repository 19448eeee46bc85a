"""A real Slurm for tests/slurm/: munged, slurmctld and two slurmd daemons on this machine.

The session fixture ``slurm`` writes ``slurm.conf`` from ``slurm.conf.in`` (this directory) into a
scratch directory, starts the daemons there (about 5 s), hands the tests a :class:`SlurmCluster`
and stops every daemon by its PID at the end. Where the Slurm programs are not installed the tests
skip with the reason, except under CI (``CI`` or ``IGRPO_REQUIRE_SLURM=1`` set), where they fail: the
main CI lane installs Slurm (``.ci/run``), so a missing one is a broken set-up, not a reason to skip.

The scratch directory is under /var/tmp, not /tmp: the tests run parts of a job in a private mount
namespace with its own /tmp and /dev/shm (as if on another machine), and everything a job shares
between its "nodes" (run directories, logs) must live outside those.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from igrpo_megatron.config.ports import free_port

HERE = Path(__file__).resolve().parent
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "srun")
SCRATCH_ROOT = os.environ.get("IGRPO_SLURM_SCRATCH", "/var/tmp")
# Terminal job states (without accounting, slurmctld forgets a job MinJobAge = 300 s after it ends).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def private_tmp_blocker() -> str | None:
    """Why jobs cannot have a private /tmp here, or None: job_container/tmpfs mounts a fresh /tmp for
    every job, which would hide a checkout (or its Python) that itself lives under /tmp."""
    for path in (HERE.parents[1], Path(sys.prefix)):
        if path.resolve().is_relative_to("/tmp"):
            return (f"{path} lies under /tmp, which job_container/tmpfs would hide from the jobs; they run "
                    "without private /tmp and /dev/shm here (clone outside /tmp to test the isolation)")
    return None


def _which(name: str) -> str | None:
    # Debian installs the daemons in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@dataclass
class Job:
    """One job as ``scontrol show job`` reports it (every component of a heterogeneous job)."""

    job_id: int
    states: list[str]
    exit_codes: list[str]
    restarts: int
    nodes: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(s in FINAL_STATES for s in self.states)


class SlurmCluster:
    """The running daemons and the environment every client command (and job) needs."""

    def __init__(self, scratch: Path):
        self.dir = scratch
        self.conf = scratch / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"}

    # ------------------------------------------------------------------ daemons
    def start(self) -> None:
        d = self.dir
        d.chmod(0o755)  # mkdtemp makes it 0700; munged wants every directory above its socket open to all
        for sub in ("munge", "state", "spool/n1", "spool/n2", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "munge").chmod(0o755)
        values = {"HOST": socket.gethostname().split(".")[0], "DIR": str(d), "CTLD_PORT": free_port(),
                  "N1_PORT": free_port(), "N2_PORT": free_port()}
        for name in ("slurm.conf", "job_container.conf"):  # slurmd reads the second next to the first
            text = (HERE / f"{name}.in").read_text()
            for key, value in values.items():
                text = text.replace(f"@{key}@", str(value))
            if private_tmp_blocker() is not None:
                text = text.replace("JobContainerType=job_container/tmpfs", "JobContainerType=job_container/none")
            (d / name).write_text(text)
        m = d / "munge"
        self._run(["mungekey", "--create", f"--keyfile={m}/munge.key"])
        self._run(["munged", f"--socket={m}/munge.socket.2", f"--key-file={m}/munge.key",
                   f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"])
        log = open(d / "log" / "daemons.out", "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.procs.append(subprocess.Popen([_which("slurmctld"), "-f", str(self.conf), "-D"], env=self.env,
                                           stdout=log, stderr=log))
        for node in ("n1", "n2"):
            self.procs.append(subprocess.Popen([_which("slurmd"), "-f", str(self.conf), "-D", "-N", node],
                                               env=self.env, stdout=log, stderr=log))
        self._wait_idle(timeout=90)

    def _run(self, argv: list[str]) -> str:
        argv = [_which(argv[0]) or argv[0], *argv[1:]]
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {self.dir / 'log'}")
            try:
                states = self._run(["sinfo", "-h", "-N", "-o", "%N %t"])
            except (RuntimeError, subprocess.TimeoutExpired):
                states = ""
            if sorted(states.split()) == ["idle", "idle", "n1", "n2"]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s (sinfo: {states!r}); see {self.dir / 'log'}")

    def stop(self) -> None:
        try:
            subprocess.run([_which("scancel") or "scancel", "--full", "--user=root"], env=self.env,
                           capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for proc in reversed(self.procs):  # slurmd first, slurmctld last
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        pid_file = self.dir / "munge" / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        if hasattr(self, "_log"):
            self._log.close()

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: int) -> Job | None:
        """The job's components as slurmctld reports them; None once it has forgotten the job."""
        proc = subprocess.run([_which("scontrol"), "show", "job", "-o", str(job_id)], env=self.env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            return None
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        fields = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]
        return Job(job_id, [f["JobState"] for f in fields], [f.get("ExitCode", "") for f in fields],
                   max(int(f.get("Restarts", "0")) for f in fields), [f.get("NodeList", "") for f in fields])

    def wait(self, job_id: int, timeout: float, until=None) -> Job:
        """Poll until the job has ended (or ``until(job)`` holds); fail the test with the logs on timeout."""
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job is not None and (until(job) if until else job.done):
                return job
            time.sleep(1.0)
        subprocess.run([_which("scancel"), str(job_id)], env=self.env, capture_output=True, timeout=30)
        pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s (last seen: {job}); "
                    f"slurmctld log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        path = self.dir / "log" / "slurmctld.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no slurmctld log)"


def _missing_programs() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


@pytest.fixture(scope="session")
def slurm():
    missing = _missing_programs()
    if missing:
        reason: str | None = (f"Slurm is not installed (missing: {', '.join(missing)}); install it with "
                  "`apt-get install slurmctld slurmd slurm-client munge` (.ci/run does)")
    elif os.geteuid() != 0:
        reason = ("the Slurm tests start slurmd as root (SlurmdUser=root) and run a job step in a private "
                  "mount namespace: run them as root (CI does)")
    else:
        reason = None
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("IGRPO_REQUIRE_SLURM") == "1":
            pytest.fail(f"CI (or IGRPO_REQUIRE_SLURM=1) is set, so the Slurm tests must run: {reason}")
        pytest.skip(reason)
    scratch = Path(tempfile.mkdtemp(prefix="igrpo-slurm-", dir=SCRATCH_ROOT))
    cluster = SlurmCluster(scratch)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    if not os.environ.get("IGRPO_SLURM_KEEP"):  # set it to look at the run directories and logs afterwards
        shutil.rmtree(scratch, ignore_errors=True)
