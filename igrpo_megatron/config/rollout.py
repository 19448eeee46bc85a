"""Recipe section for the vLLM rollout sidecar: how it runs, how it samples, how weights reach it.

Composed into the recipe as ``recipe.rollout``. The server block is read by
``igrpo_megatron.rollout.server.RolloutServer``, the sampling/retry blocks by the async client and
the weight-sync block by ``igrpo_megatron.rollout.weight_sync``. ``validate()`` returns every problem
at once so that the loader can report them together.
"""

from __future__ import annotations

from dataclasses import dataclass

from igrpo_megatron.config.fields import choice_errors, param

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
WEIGHT_TRANSPORTS = ("auto", "shm_reload", "gloo", "nccl")


@dataclass
class RolloutServerConfig:
    """Where the vLLM OpenAI server runs and how it is started."""

    url: str | None = param(None, help="Base URL of a vLLM server started elsewhere (e.g. the vLLM node group "
                                       "of a Slurm job: 'http://node12:8000'). When set, nothing is started "
                                       "here and the fields below that configure the process are ignored. "
                                       "null: start a local server process.")
    model_path: str | None = param(None, help="HF checkpoint directory the sidecar loads at start "
                                              "(config.json + safetensors + tokenizer). null: use "
                                              "recipe.model.hf_path, or the trainer's exported initial weights.")
    host: str = param("127.0.0.1", help="Interface the local server binds to. Use '0.0.0.0' to serve other nodes.")
    port: int = param(8000, help="Port of the local server. 0: pick a free port at the first start and keep "
                                 "it across restarts.")
    served_model_name: str | None = param(None, help="Name the server registers the model under (sent as "
                                                     "'model' in requests). null: vLLM's default (the path).")
    tensor_parallel_size: int = param(1, help="vLLM tensor-parallel ranks (GPUs per model replica).")
    data_parallel_size: int = param(1, help="vLLM data-parallel replicas behind the one HTTP endpoint.")
    max_model_len: int | None = param(None, help="Longest prompt + completion the server accepts. Must cover "
                                                 "the Stage-2 prompt (question + draft + wrapper) plus "
                                                 "sampling.max_tokens. null: the model's max_position_embeddings.")
    dtype: str = param("auto", choices=DTYPES,
                       help="Weight/activation dtype in vLLM. 'float32' on CPU (log-probs must match the "
                            "trainer); 'bfloat16' on GPU; 'auto' takes the checkpoint's dtype.")
    seed: int = param(0, help="vLLM engine seed (requests without their own seed draw from it).")
    kv_cache_space_gib: float | None = param(
        2.0, help="CPU only: KV-cache size in GiB, exported as VLLM_CPU_KVCACHE_SPACE. Keep it small on "
                  "laptops/CI. null: leave the variable unset (vLLM's default). Ignored on GPU.")
    gpu_memory_utilization: float | None = param(
        None, help="GPU only: fraction of device memory vLLM may use (weights + KV cache). Lower it when "
                   "the trainer shares the GPU. null: vLLM's default (0.9).")
    max_num_seqs: int | None = param(None, help="Most sequences decoded together in one engine step. "
                                                "null: vLLM's default.")
    logprobs_mode: str = param("processed_logprobs", choices=LOGPROBS_MODES,
                               help="Which log-probs vLLM returns: 'processed_logprobs' are those of the "
                                    "distribution actually sampled (after temperature; keep top_p 1 in "
                                    "training), and the trainer then scores tokens at the sampling "
                                    "temperature too; 'raw_logprobs' are the model's own (temperature 1), "
                                    "and the trainer then uses temperature 1.")
    enforce_eager: bool = param(False, help="Disable CUDA graphs (GPU). Slower decoding, faster start.")
    extra_args: list[str] = param(default_factory=list,
                                  help="More command-line arguments for vllm.entrypoints.openai.api_server, "
                                       "appended verbatim (e.g. ['--enable-prefix-caching']).")
    extra_env: dict[str, str] = param(default_factory=dict,
                                      help="More environment variables for the server process "
                                           "(e.g. {'VLLM_CPU_OMP_THREADS_BIND': '0-1'}).")
    log_dir: str | None = param(None, help="Directory for the server's stdout/stderr log "
                                           "(vllm-server-<port>.log). null: the run's output directory.")
    start_timeout_s: float = param(300.0, help="Seconds to wait for /health to answer before giving up "
                                               "(and stopping the process).")
    shutdown_grace_s: float = param(15.0, help="Seconds between SIGTERM and SIGKILL when stopping the server.")
    max_restarts: int = param(3, help="How often a crashed local server is restarted before the run fails. "
                                      "0: never restart.")
    health_poll_interval_s: float = param(1.0, help="Seconds between health checks, while starting and "
                                                    "while watching a running server.")


@dataclass
class SamplingConfig:
    """How completions are sampled during training rollouts (evaluation has its own settings)."""

    temperature: float = param(0.7, help="Sampling temperature (paper: 0.7 in training). 0: greedy.")
    top_p: float = param(1.0, help="Nucleus sampling mass. 1.0: off.")
    top_k: int = param(-1, help="Sample from the k most likely tokens only. -1: off.")
    max_tokens: int = param(4096, help="Most completion tokens per sample (paper: 4,096).")
    stop: list[str] = param(default_factory=list, help="Stop strings: generation ends when one appears; the "
                                                       "returned text excludes it, finish_reason is 'stop'.")
    n: int = param(1, help="Samples per request. The rollout stages set it from algorithm.igrpo.num_drafts / "
                           "num_refinements / algorithm.group_size; keep 1 here unless calling the client directly.")
    logprobs: bool = param(True, help="Return the log-prob of every sampled token (needed for the "
                                      "importance ratio and for checking the sidecar against the trainer).")
    seed: int | None = param(None, help="Seed for every request (sample i of a request uses seed + i), making "
                                        "rollouts reproducible. null: the engine's random stream.")


@dataclass
class RetryConfig:
    """How the client treats transient failures (connection errors, HTTP 5xx)."""

    max_attempts: int = param(5, help="Tries per request, the first included. 1: no retries.")
    initial_backoff_s: float = param(0.5, help="Wait before the first retry; doubles after every failure.")
    max_backoff_s: float = param(10.0, help="Longest wait between two tries.")
    request_timeout_s: float = param(3600.0, help="Seconds a single HTTP request may take (long CPU "
                                                  "generations included) before it counts as failed.")


@dataclass
class WeightSyncConfig:
    """How fresh policy weights reach the sidecar after every optimizer step."""

    transport: str = param("auto", choices=WEIGHT_TRANSPORTS,
                           help="How the weights travel. 'shm_reload': HF-named safetensors written under "
                                "shm_root, which vLLM reloads (the server must see that directory: same node). "
                                "'gloo': streamed in buckets through vLLM's weight-transfer engine API over a "
                                "torch.distributed gloo group (any machine; the server needs this project "
                                "installed, which registers the engine as a vLLM plugin). 'nccl': the same "
                                "with vLLM's own NCCL engine (GPUs on both sides, vLLM in the trainer). 'auto': "
                                "shm_reload when the trainer starts the server itself (rollout.server.url null), "
                                "else nccl where CUDA and vLLM are both importable in the trainer's Python, else "
                                "gloo.")
    master_address: str | None = param(None, help="gloo/nccl: address of the trainer that the server's workers "
                                                  "connect to (it hosts the group's TCP store). null: this "
                                                  "machine's address on the route to the server.")
    master_port: int = param(0, help="gloo/nccl: port of that store. 0: a free port. Must be reachable from "
                                     "the server's node (firewalls).")
    socket_ifname: str | None = param(None, help="gloo: network interface the trainer's end of the group uses "
                                                 "(e.g. 'ib0'). null: $GLOO_SOCKET_IFNAME, else the interface "
                                                 "holding master_address. The server side reads "
                                                 "$GLOO_SOCKET_IFNAME, else the interface that routes to the "
                                                 "trainer.")
    shm_root: str = param("/dev/shm", help="Directory the weight files are written under. Must be visible "
                                           "to the server process (same machine, or a shared filesystem).")
    bucket_size_mb: int = param(512, help="Largest safetensors shard written at once (shm_reload), or largest "
                                          "bucket broadcast at once (gloo/nccl), in MiB; bounds the extra "
                                          "memory held while streaming tensors out.")
    keep_files: bool = param(False, help="Keep the weight directory after the reload (debugging only).")
    rpc_timeout_s: float = param(600.0, help="Seconds the server may take to reload the weights (shm_reload), "
                                             "or to form the group / receive one bucket (gloo/nccl).")


@dataclass
class RolloutConfig:
    """The rollout sidecar: server, sampling, client limits, weight sync and the iGRPO group sizes."""

    server: RolloutServerConfig = param(default_factory=RolloutServerConfig, help="The vLLM server process.")
    sampling: SamplingConfig = param(default_factory=SamplingConfig, help="Training-time sampling settings.")
    retry: RetryConfig = param(default_factory=RetryConfig, help="Client retries on transient failures.")
    weight_sync: WeightSyncConfig = param(default_factory=WeightSyncConfig,
                                          help="How new policy weights are pushed to the server.")
    max_concurrency: int = param(64, help="Most HTTP requests the client keeps in flight at once "
                                          "(each request is one prompt with n samples).")

    def errors(self, prefix: str = "rollout") -> list[str]:
        """Every rule this section breaks, each naming the key and the fix (empty when valid)."""
        errors: list[str] = []
        errors.extend(choice_errors(self, "rollout"))
        s, p, r, w = self.server, self.sampling, self.retry, self.weight_sync
        positive = {
            "rollout.server.tensor_parallel_size": s.tensor_parallel_size,
            "rollout.server.data_parallel_size": s.data_parallel_size,
            "rollout.server.start_timeout_s": s.start_timeout_s,
            "rollout.server.health_poll_interval_s": s.health_poll_interval_s,
            "rollout.sampling.max_tokens": p.max_tokens,
            "rollout.sampling.n": p.n,
            "rollout.retry.max_attempts": r.max_attempts,
            "rollout.retry.request_timeout_s": r.request_timeout_s,
            "rollout.weight_sync.bucket_size_mb": w.bucket_size_mb,
            "rollout.max_concurrency": self.max_concurrency,
        }
        for key, value in positive.items():
            if value <= 0:
                errors.append(f"{key} = {value}: must be > 0; set it to a positive value.")
        if not 0 <= w.master_port <= 65535:
            errors.append(f"rollout.weight_sync.master_port = {w.master_port}: must be in 0..65535 (0 picks a "
                          "free port).")
        if not 0 <= s.port <= 65535:
            errors.append(f"rollout.server.port = {s.port}: must be in 0..65535 (0 picks a free port).")
        if s.max_restarts < 0:
            errors.append(f"rollout.server.max_restarts = {s.max_restarts}: must be >= 0 (0: never restart).")
        if s.url is not None and not s.url.startswith(("http://", "https://")):
            errors.append(f"rollout.server.url = {s.url!r}: must start with http:// or https://, "
                          "or be null to start a local server.")
        if p.temperature < 0:
            errors.append(f"rollout.sampling.temperature = {p.temperature}: must be >= 0 (0 is greedy).")
        if not 0 < p.top_p <= 1:
            errors.append(f"rollout.sampling.top_p = {p.top_p}: must be in (0, 1]; 1.0 turns it off.")
        if s.gpu_memory_utilization is not None and not 0 < s.gpu_memory_utilization <= 1:
            errors.append(f"rollout.server.gpu_memory_utilization = {s.gpu_memory_utilization}: must be in "
                          "(0, 1], or null for vLLM's default.")
        if s.max_model_len is not None and s.max_model_len <= p.max_tokens:
            errors.append(f"rollout.server.max_model_len = {s.max_model_len} leaves no room for a prompt "
                          f"before rollout.sampling.max_tokens = {p.max_tokens}; raise max_model_len.")
        return errors

