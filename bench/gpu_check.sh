#!/usr/bin/env bash
# The GPU check, one prepared script, about 10 minutes on one GPU:
#   1. the tests that touch CUDA paths (tests/pipeline/test_cuda.py: every method's step under bf16 autocast on the GPU,
#      staged state, the kNN monitor, the encoder EMA, LARS) plus the learning check;
#   2. in-memory vs stream-fed throughput of the default method, ConvNet and ResNet-18, bf16 autocast;
#   3. a 300k-sample default run and its full-set kNN.
#
# Here (a machine with the project's venv):  bash bench/gpu_check.sh prepare
#   copies Fashion-MNIST and the wheels the GPU image lacks into .gpu/ (git-ignored; ~35 MB).
# On the GPU machine (python3 there holds a CUDA torch):  bash bench/gpu_check.sh [OUT_DIR]
#   with the device tool: run(command="bash bench/gpu_check.sh $OUT", carry=[".gpu"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu/fashion-mnist .gpu/wheels
  cp "$(.venv/bin/python -m streamssl.streams.fashion_mnist)"/*.gz .gpu/fashion-mnist/  # the copy runs here read
  # Pure-Python wheels the GPU image does not ship (torch, numpy, pyyaml, safetensors, prometheus-client,
  # pillow, pytest are there).
  .venv/bin/pip download -q --no-deps -d .gpu/wheels webdataset==1.0.2 braceexpand==0.1.7
  du -sh .gpu
  exit 0
fi

OUT=${1:-gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export STREAMSSL_FASHION_MNIST=$PWD/.gpu/fashion-mnist
$PY -m pip install -q --no-deps --no-index .gpu/wheels/*.whl
$PY -m pip install -q --no-deps --no-build-isolation -e .
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c "import torch; print('torch', torch.__version__)"; } \
  | tee "$OUT/gpu.txt"

echo "== 1. CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/pipeline/test_cuda.py tests/pipeline/test_learning.py 2>&1 | tail -15 | tee "$OUT/tests.txt" || true

echo "== 2. throughput, in memory vs stream-fed, bf16 autocast"
for backbone in convnet resnet18; do
  timeout 150 $PY bench/pipeline_efficiency.py --steps 60 --rounds 2 --set train.device=cuda --set train.precision=bf16 \
    --set model.backbone=$backbone 2>&1 | tail -4 | tee "$OUT/throughput-$backbone.txt" || true
done

echo "== 3. the default run to 300k samples and its full-set kNN"
timeout 240 $PY bench/knn_budget.py --samples 300000 --no-probes -- --set train.device=cuda 2>&1 | tail -8 \
  | tee "$OUT/default-300k.txt" || true
