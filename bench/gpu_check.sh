#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on one GPU with only Python 3.12 + a CUDA torch in the image.
#
#   bash bench/gpu_check.sh [--out DIR]        # from the repository root; under 8 minutes
#   bash bench/gpu_check.sh --cpu-tiny         # the same script, tiny model on CPU (the suite's test)
#
# Nothing can be downloaded on the GPU machine: any package the trainer imports that the image
# lacks is installed from ./wheels (made beforehand on a machine with a registry, see bench/RESULTS.md):
# (the versions of the Python 3.12 compat lane; ~20 MB in all; antlr4 4.9.3 has no wheel on PyPI, so build one)
#   pip download megatron-core==0.19.2 numpy==2.5.5 omegaconf==2.3.1 hydra-core==1.3.8 pyyaml==6.0.4 einops==0.8.2 \
#       packaging==26.4 psutil==7.2.2 tqdm==4.70.1 --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d wheels/
#   pip wheel antlr4-python3-runtime==4.9.3 --no-deps -w wheels/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}

# module:distribution pairs the training path imports (beyond torch and its own dependencies)
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"megatron.core": "megatron-core", "numpy": "numpy", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
        "hydra": "hydra-core", "yaml": "pyyaml", "einops": "einops", "packaging": "packaging", "psutil": "psutil",
        "tqdm": "tqdm"}
def present(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False
print(" ".join(dist for mod, dist in need.items() if not present(mod)))
PYEOF
)
if [ -n "$missing" ]; then
    echo "installing from $WHEELS: $missing"
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" $missing
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" -m bench.gpu_check "$@"
