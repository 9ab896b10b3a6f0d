#!/usr/bin/env bash
# Download onnxruntime-gpu for the lent GPU machine (Python 3.12, CUDA 13) and split it
# into parts small enough for the device tool (64 MiB a call), one ignored folder each:
# .ortgpu1/, .ortgpu2/, ... See benchmarks/gpu/README.md for how they are used.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=${ORTGPU_VERSION:-1.31.1}
tmp=$(mktemp -d)
pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$tmp" "onnxruntime-gpu==$VERSION"
wheel=$(ls "$tmp"/onnxruntime_gpu-*.whl)
rm -rf .ortgpu*/
split -b 60M -d -a 1 "$wheel" "$tmp/part"
i=1
for part in "$tmp"/part*; do
    mkdir -p ".ortgpu$i"
    mv "$part" ".ortgpu$i/"
    i=$((i + 1))
done
basename "$wheel" > .ortgpu1/WHEEL_NAME
grep -qx '.ortgpu\*/' .git/info/exclude 2>/dev/null || echo '.ortgpu*/' >> .git/info/exclude
ls -la .ortgpu*/
