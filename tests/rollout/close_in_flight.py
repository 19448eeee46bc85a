"""A trainer-like process stopped by SIGTERM in the middle of a rollout (run by test_keepalive.py).

    python -m tests.rollout.close_in_flight URL MODEL_DIR

SIGTERM is handled as ``igrpo train`` handles it (``sys.exit(143)`` unwinding through cleanup), and
cleanup closes the parts in the training loop's order. The rollout is one ``TwoStageRollout.run`` on
a ``BlockingRolloutClient``, as in training; SIGTERM arrives once requests are on the server.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time


def main(url: str, model_dir: str) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    from igrpo_megatron.config.algorithm import AlgorithmConfig
    from igrpo_megatron.config.reward import RewardConfig
    from igrpo_megatron.config.training import DataConfig
    from igrpo_megatron.data.datasets import PromptRecord
    from igrpo_megatron.data.prompts import PromptFormatter
    from igrpo_megatron.rewards.registry import build_reward
    from igrpo_megatron.rollout.client import BlockingRolloutClient, RolloutClient
    from igrpo_megatron.rollout.interfaces import SamplingParams
    from igrpo_megatron.rollout.two_stage import TwoStageRollout

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # as cli.py does for `igrpo train`
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(model_dir), DataConfig())
    reward_cfg = RewardConfig()
    reward_cfg.math.num_workers = 1
    reward = build_reward(reward_cfg)
    client = BlockingRolloutClient(RolloutClient(url))
    # Long random-init completions: the requests are still decoding when SIGTERM comes.
    rollout = TwoStageRollout(client.client, fmt, reward, AlgorithmConfig(group_size=4),
                              SamplingParams(temperature=1.0, max_tokens=400), max_prompt_length=100, run_seed=0)
    records = [PromptRecord(f"What is {i} + 1?", str(i + 1)) for i in range(8)]

    def stop_when_busy() -> None:
        while client.client.in_flight < len(records):
            time.sleep(0.02)
        print(f"requests in flight: {client.client.in_flight}", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_busy, daemon=True).start()
    try:
        client.run(rollout.run(records, step=0))
        print("the rollout finished before SIGTERM", flush=True)
        return 0
    finally:
        for part in (rollout, reward, client):  # the training loop's cleanup order
            part.close()
        print("closed", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
