#!/usr/bin/env bash
# Install torch into the venv: the CPU build on a machine without an NVIDIA GPU.
#
# From PyPI, torch for Linux is the CUDA build (about 0.5 GB, plus several GB of
# nvidia-* wheels), useless without a GPU; PyTorch publishes the CPU build on its
# own wheel index. TORCH_INDEX picks the index: "auto" (the default: the CPU index
# unless nvidia-smi is on PATH), "pypi" (pip's default index), or any index URL
# (e.g. https://download.pytorch.org/whl/cu126). If the chosen index cannot be
# used, pip's default index is tried, and the line printed at the end says which
# build was installed.
#
# Called by `make install` as: PIP=... PYTHON=... TORCH=torch==X TORCH_INDEX=... install_torch.sh
set -euo pipefail
: "${PIP:?}" "${PYTHON:?}" "${TORCH:?}"
TORCH_INDEX="${TORCH_INDEX:-auto}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

if [ "$TORCH_INDEX" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then TORCH_INDEX=pypi; else TORCH_INDEX="$CPU_INDEX"; fi
fi

if [ "$TORCH_INDEX" = pypi ]; then
    "$PIP" install --quiet "$TORCH"
    source="pip's default index"
elif "$PIP" install --quiet --retries 1 --timeout 30 --index-url "$TORCH_INDEX" "$TORCH"; then
    source="$TORCH_INDEX"
else
    echo "torch: could not install from $TORCH_INDEX; trying pip's default index" >&2
    "$PIP" install --quiet "$TORCH"
    source="pip's default index (fallback)"
fi
build=$("$PYTHON" -c "import torch; v = torch.version.cuda; print(torch.__version__, '(CUDA ' + v + ' build)' if v else '(CPU build)')")
echo "torch: installed $build (pip index: $source)"
