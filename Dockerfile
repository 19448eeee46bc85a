# Container for multi-node GPU runs (Slurm + pyxis, or docker run --gpus all).
#
#   docker build -t igrpo-megatron .
#   srun --container-image=igrpo-megatron ... (see slurm/igrpo.sbatch, IGRPO_CONTAINER)
#
# Two Python environments, because vLLM pins its own torch build:
#   - the system Python of the NGC PyTorch image (torch + CUDA + Transformer Engine) runs the
#     Megatron-Core trainer, with megatron-core, megatron-bridge and the Mamba kernels added;
#   - /opt/vllm is a separate venv for the vLLM sidecar (`igrpo serve-rollout` starts it through
#     IGRPO_VLLM_PYTHON, which the sidecar lifecycle uses to run vLLM's OpenAI server). The two
#     talk over HTTP and shared memory, never through imports.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    IGRPO_VLLM_PYTHON=/opt/vllm/bin/python

# Trainer side: Megatron-Core (current release line), Megatron-Bridge for HF <-> Megatron weights,
# and the Mamba2 kernels for Nemotron-H. Transformer Engine ships with the base image.
RUN pip install "megatron-core>=0.19,<0.20" "megatron-bridge" \
 && pip install --no-build-isolation "mamba-ssm>=2.2" "causal-conv1d>=1.4"

# Sidecar side: vLLM alone in its own venv.
RUN python -m venv /opt/vllm && /opt/vllm/bin/pip install "vllm>=0.11"

WORKDIR /opt/igrpo-megatron
COPY pyproject.toml README.md ./
COPY igrpo_megatron ./igrpo_megatron
RUN pip install -e .
COPY recipes ./recipes
COPY launchers ./launchers
COPY slurm ./slurm
COPY bench ./bench

CMD ["igrpo", "--help"]
