#!/usr/bin/env bash
# Install PyTorch into the interpreter $PY, choosing the CPU build when there is no NVIDIA GPU.
# An unpinned `pip install torch` on Linux pulls several GB of CUDA wheels, which a CPU-only
# machine never uses.
set -euo pipefail
PY=${PY:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if "$PY" -c "import torch" 2>/dev/null; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
    exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the default (CUDA) build of torch"
    "$PY" -m pip install -q "torch==${TORCH_VERSION}"
    exit 0
fi

echo "No NVIDIA GPU: installing the CPU build of torch ${TORCH_VERSION}"
# 1. a CPU wheel already on this machine (pip's configured find-links), no network needed;
# 2. PyTorch's CPU wheel index;
# 3. whatever the default index serves, as a last resort.
if "$PY" -m pip install -q --no-index --no-deps "torch==${TORCH_VERSION}" 2>/dev/null; then
    "$PY" -m pip install -q "torch==${TORCH_VERSION}"   # its dependencies, from the index
else
    "$PY" -m pip install -q --timeout 30 --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" \
      || "$PY" -m pip install -q "torch==${TORCH_VERSION}"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.version.cuda else 'cpu build')"
