"""A sidecar whose starter is SIGKILLed stops by itself (issue 22, item 1: never left running).

SIGKILL (the kernel's OOM killer, a scheduler's last resort) runs no clean-up and no atexit hook;
the server is started under ``setpriv --pdeathsig SIGTERM``, so the kernel tells it to stop.
Before: the vLLM server kept running with parent PID 1, still answering.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igrpo_megatron.rollout.server import live_group_members

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.faults, pytest.mark.timeout(900)]

STARTER = """
import sys, time
from igrpo_megatron.config.rollout import RolloutServerConfig
from igrpo_megatron.rollout.server import RolloutServer

cfg = RolloutServerConfig(port=0, dtype="float32", kv_cache_space_gib=1, max_model_len=256, enforce_eager=True,
                          start_timeout_s=600.0)
server = RolloutServer(cfg, model_path=sys.argv[1], log_dir=sys.argv[2])
server.start()
print("PID", server.pid, flush=True)
time.sleep(3600)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is not installed")
def test_sidecar_of_a_killed_process_stops_itself(tiny_model_dir, tmp_path):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tiny_model_dir), str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = starter.stdout.readline()
    assert line.startswith("PID"), f"the server did not start (log in {tmp_path})"
    pid = int(line.split()[1])
    try:
        assert live_group_members(pid)
        starter.kill()
        starter.wait(timeout=60)
        deadline = time.monotonic() + 90
        while live_group_members(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not live_group_members(pid), "the sidecar outlived the SIGKILLed process that started it"
    finally:
        if live_group_members(pid):
            os.killpg(pid, signal.SIGKILL)
