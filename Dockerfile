# Container for multi-node GPU runs (Slurm + pyxis, or docker run --gpus all).
#
#   docker build -t igrpo-megatron .
#   docker run --gpus all igrpo-megatron igrpo doctor recipes/nemotron_h_8b_igrpo.yaml   # first, on a new cluster
#   srun --container-image=igrpo-megatron ... (see slurm/igrpo.sbatch, IGRPO_CONTAINER)
#
# Every version comes from docker/constraints.txt (each pip install below takes `-c` it; the base
# image tag there must equal BASE_IMAGE's default, which tests/test_container.py checks).
#
# Two Python environments, because vLLM pins its own torch build:
#   - the system Python of the NGC PyTorch image (torch, CUDA, NCCL) runs the Megatron-Core trainer,
#     with Transformer Engine, megatron-core and the Mamba kernels at the pinned versions;
#   - /opt/vllm is a separate venv for the vLLM sidecar (`igrpo serve-rollout` starts it through
#     IGRPO_VLLM_PYTHON, which the sidecar lifecycle uses to run vLLM's OpenAI server). The two talk
#     over HTTP, shared memory or a weight-transfer group, never through imports.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.06-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    IGRPO_VLLM_PYTHON=/opt/vllm/bin/python

WORKDIR /opt/igrpo-megatron
COPY docker/constraints.txt ./docker/constraints.txt

# Trainer side. NGC images pin every package they ship in /etc/pip/constraint.txt (PIP_CONSTRAINT),
# Transformer Engine included, at the image's own version; keep only that file's torch/triton lines
# (the image's CUDA build must stay) and take everything else from the project's pins. The Mamba and
# TE extensions compile against that torch, hence --no-build-isolation.
RUN { grep -E '^(torch|triton)==' /etc/pip/constraint.txt || true; } > /tmp/ngc-torch.txt \
 && PIP_CONSTRAINT="" pip install --no-build-isolation -c /tmp/ngc-torch.txt -c docker/constraints.txt \
        "transformer-engine[pytorch,core_cu13]" megatron-core mamba-ssm causal-conv1d

# Sidecar side: vLLM alone in its own venv, plus this project without dependencies so that vLLM
# finds its 'gloo' weight-transfer engine plugin (entry point vllm.general_plugins).
RUN python -m venv /opt/vllm \
 && PIP_CONSTRAINT="" /opt/vllm/bin/pip install -c docker/constraints.txt vllm

COPY pyproject.toml README.md ./
COPY igrpo_megatron ./igrpo_megatron
# The project itself: its own dependencies only (torch, TE and megatron-core are already there).
RUN PIP_CONSTRAINT="" pip install -c /tmp/ngc-torch.txt -c docker/constraints.txt -e . \
 && PIP_CONSTRAINT="" /opt/vllm/bin/pip install --no-deps -e .
COPY recipes ./recipes
COPY launchers ./launchers
COPY slurm ./slurm
COPY bench ./bench

# Smoke test at build time (no GPU attached): the pinned versions are the installed ones, the GPU
# packages are there, and the sidecar's vLLM serves every endpoint the project calls.
RUN igrpo doctor --no-gpu --constraints docker/constraints.txt recipes/nemotron_h_8b_igrpo.yaml

CMD ["igrpo", "--help"]
