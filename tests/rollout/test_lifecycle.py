"""Sidecar lifecycle: command line from the recipe, start/health/stop, crash -> clear error -> restart.

The first tests drive ``RolloutServer`` with a small fake server script (fast, and able to ignore
SIGTERM or die at start). The last ones use the session's real vLLM server, kill it mid-batch, and
finally stop it, so this module runs after all others (``RUN_LAST``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from igrpo_megatron.config.rollout import RetryConfig
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import (
    CompletionGroup,
    SamplingParams,
    SidecarRestartLimitError,
    SidecarStartError,
    SidecarUnavailableError,
    StaleWeightsError,
)
from igrpo_megatron.rollout.server import RolloutServer, live_group_members, serve_from_recipe
from tests.rollout.conftest import sidecar_config

RUN_LAST = True

FAKE_SERVER = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys
    mode, port = sys.argv[1], int(sys.argv[2])
    print(f"fake server starting pid={os.getpid()}", flush=True)
    if mode == "die":
        print("FATAL: model directory has no config.json", flush=True)
        sys.exit(3)
    stubborn = mode == "stubborn"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A child like vLLM's engine core: it must die with the group.
    code = "import signal, time\\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if stubborn else "") \\
        + "time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", code])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


class FakeServer(RolloutServer):
    """``RolloutServer`` whose process is the fake script instead of vLLM."""

    mode = "ok"

    def command(self) -> list[str]:
        return [sys.executable, str(self.log_dir / "fake_server.py"), self.mode, str(self.port)]


def _fake(tmp_path, mode: str, **cfg) -> FakeServer:
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    server = FakeServer(sidecar_config(health_poll_interval_s=0.1, **cfg), model_path=tmp_path, log_dir=tmp_path)
    server.mode = mode
    return server


def test_command_and_environment_come_from_the_recipe(tmp_path):
    cfg = sidecar_config(port=8123, tensor_parallel_size=2, data_parallel_size=3, max_model_len=2048, seed=5,
                         kv_cache_space_gib=1.5, served_model_name="policy", extra_args=["--max-logprobs", "2"],
                         extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    server = RolloutServer(cfg, model_path=tmp_path)
    cmd = " ".join(server.command())
    assert "-m vllm.entrypoints.openai.api_server --model " + str(tmp_path) in cmd
    for part in ["--port 8123", "--tensor-parallel-size 2", "--data-parallel-size 3", "--max-model-len 2048",
                 "--seed 5", "--dtype float32", "--served-model-name policy", "--logprobs-mode processed_logprobs"]:
        assert part in cmd
    assert cmd.endswith("--max-logprobs 2") and "--gpu-memory-utilization" not in cmd
    env = server.environment()
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1.5"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert server.url == "http://127.0.0.1:8123"


def test_missing_model_path_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="rollout.server.model_path"):
        RolloutServer(sidecar_config())


def test_external_server_is_only_watched(tmp_path):
    server = RolloutServer(sidecar_config(url="http://127.0.0.1:9/", start_timeout_s=0.3,
                                          health_poll_interval_s=0.1))
    assert server.url == "http://127.0.0.1:9" and not server.is_healthy()
    with pytest.raises(SidecarStartError, match="start_timeout_s"):
        server.start()
    with pytest.raises(SidecarRestartLimitError, match="external"):
        server.restart()


def test_start_and_stop_kill_the_whole_group(tmp_path):
    server = _fake(tmp_path, "ok")
    server.start()
    pgid = server.pid
    assert server.is_healthy() and len(live_group_members(pgid)) == 2  # server + child
    server.stop()
    assert live_group_members(pgid) == [] and not server.is_healthy()
    assert "fake server starting" in server.log_path.read_text()


def test_sigterm_ignored_escalates_to_sigkill(tmp_path):
    server = _fake(tmp_path, "stubborn", shutdown_grace_s=1.0)
    server.start()
    pgid = server.pid
    t0 = time.monotonic()
    server.stop()
    assert 1.0 <= time.monotonic() - t0 < 10
    assert live_group_members(pgid) == []


def test_death_during_start_raises_with_the_log_tail(tmp_path):
    server = _fake(tmp_path, "die")
    with pytest.raises(SidecarStartError, match="exited with code 3") as info:
        server.start()
    assert "FATAL: model directory has no config.json" in str(info.value)


def test_crash_is_restarted_up_to_the_limit(tmp_path):
    server = _fake(tmp_path, "ok", max_restarts=1)
    server.start()
    try:
        assert server.ensure_running() is False  # healthy: nothing to do
        os.kill(server.pid, signal.SIGKILL)
        server._proc.wait()
        assert server.ensure_running() is True and server.is_healthy() and server.restarts == 1
        os.kill(server.pid, signal.SIGKILL)
        server._proc.wait()
        with pytest.raises(SidecarRestartLimitError, match="max_restarts = 1"):
            server.ensure_running()
    finally:
        server.stop()


def test_serve_forever_stops_the_group_on_sigterm(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path.insert(0, {str(repo)!r})\n"
            "from pathlib import Path\nfrom tests.rollout.test_lifecycle import _fake\n"
            f"_fake(Path({str(tmp_path)!r}), 'ok').serve_forever()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo)
    try:
        deadline = time.monotonic() + 60
        while not (logs := list(tmp_path.glob("vllm-server-*.log"))) or "pid=" not in logs[0].read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "serve_forever did not start the server"
            time.sleep(0.1)
        pgid = int(logs[0].read_text().split("pid=")[1].split()[0])
        assert live_group_members(pgid)
        time.sleep(0.5)  # let it reach its watch loop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert live_group_members(pgid) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_from_recipe_refuses_what_it_cannot_serve():
    recipe = RecipeConfig()
    recipe.model.hf_path = None
    recipe.rollout.server.model_path = None
    assert serve_from_recipe(recipe) == 2  # no weights to load
    recipe.rollout.server.url = "http://elsewhere:8000"
    assert serve_from_recipe(recipe) == 2  # an external server is not ours to run


# --- the real vLLM server (runs last: it is killed and finally stopped) ---------------------------


async def _until_requests_running(client: RolloutClient, timeout_s: float = 60.0) -> None:
    """Wait until vLLM's Prometheus gauge shows requests being decoded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        session = await client._get_session()
        async with session.get(f"{client.base_url}/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("vllm:num_requests_running") and float(line.split()[-1]) > 0:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError("no request was ever running on the server")


@pytest.mark.vllm
def test_crash_mid_batch_fails_loudly_then_recovers(sidecar):
    prompts = [[5 + i, 17, 42, 99] for i in range(32)]
    params = SamplingParams(temperature=1.0, max_tokens=480, seed=3)  # long enough to be killed mid-way
    quick_retry = RetryConfig(max_attempts=3, initial_backoff_s=0.2, max_backoff_s=0.5, request_timeout_s=120)
    restarts_before = sidecar.restarts

    async def batch_with_crash():
        async with RolloutClient(sidecar.url, retry=quick_retry) as client:
            task = asyncio.create_task(client.generate(prompts, params))
            await _until_requests_running(client)
            os.kill(sidecar.pid, signal.SIGKILL)  # the API server process dies, as in a crash
            return await task

    sidecar.start_watchdog()
    try:
        with pytest.raises(SidecarUnavailableError) as info:
            asyncio.run(batch_with_crash())
        err = info.value
        assert err.url == sidecar.url and sidecar.url in str(err)
        # Every request is accounted for: a group or the error that ended it, none silently dropped.
        assert len(err.results) == len(prompts)
        failed = [i for i, r in enumerate(err.results) if not isinstance(r, CompletionGroup)]
        assert failed and all(isinstance(err.results[i], SidecarUnavailableError) for i in failed)

        deadline = time.monotonic() + sidecar.cfg.start_timeout_s + 30
        while not (sidecar.restarts > restarts_before and sidecar.is_healthy()):
            assert time.monotonic() < deadline, f"server was not restarted; log:\n{sidecar.log_tail()}"
            time.sleep(1)
    finally:
        sidecar.stop_watchdog()

    async def retry_failed():
        async with RolloutClient(sidecar.url, retry=quick_retry) as client:
            return await client.generate([prompts[i] for i in failed], params)

    retried = asyncio.run(retry_failed())
    assert [g.prompt_token_ids for g in retried] == [prompts[i] for i in failed]
    assert all(len(g.completions[0].token_ids) > 0 for g in retried)

    async def as_trainer_at_version_2():  # a trainer that had pushed weights before the crash
        async with RolloutClient(sidecar.url, retry=quick_retry, initial_version=2) as client:
            return await client.generate(prompts[:1], SamplingParams(max_tokens=2))

    with pytest.raises(StaleWeightsError, match=sidecar.url):
        asyncio.run(as_trainer_at_version_2())


@pytest.mark.vllm
def test_clean_shutdown_leaves_no_process(sidecar):
    pgid = sidecar.pid
    assert live_group_members(pgid), "the server group should be running before the stop"
    sidecar.stop()
    assert live_group_members(pgid) == []
    assert not sidecar.is_healthy()
