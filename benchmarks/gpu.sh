#!/usr/bin/env bash
# The --quick benchmarks on a CUDA machine (H100/H200 image: Python 3.12 with torch preinstalled,
# no network). Needs no test fixtures: the manifests are in benchmarks/manifests and the
# random real-shape checkpoints are built into benchmarks/.cache (about a minute).
#
#   bash benchmarks/gpu.sh            # from the repository root; JSON goes to $OUT (or benchmarks/results)
#
# diffusers (the baselines) is not in that image: carry its wheel and importlib_metadata's in
# .whl/ (git-ignored) and they are installed into /tmp/site first. mlx runs only if
# `import mlx.core` finds a GPU, or if `pip install "mlx[cuda12]"` works there (it needs a
# network; mlx-cuda-13's wheel alone is 90 MB, more than a device call carries). Budget: about
# 8 minutes in all; each benchmark run is capped so the script always ends and writes its JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "gpu.sh: carried wheels did not install"
fi
export PYTHONPATH="$PWD:$PWD/backends/torch:$PWD/backends/mlx:$SITE:${PYTHONPATH:-}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "gpu.sh: no diffusers: baselines are skipped"

# torch on CUDA: float32 and bfloat16 (the backend picks CUDA by itself)
timeout 330 $PY benchmarks/run.py --quick --backend torch --timeout 240 --json "$OUT/gpu-torch-quick.json" \
    2>&1 | tee "$OUT/gpu-torch-quick.log"

# mlx on CUDA, where it can be had
if ! $PY -c "import mlx.core as mx; assert mx.default_device() == mx.gpu" 2>/dev/null; then
    timeout 60 $PY -m pip install -q --retries 0 --timeout 5 --target "$SITE" "mlx[cuda12]" >/dev/null 2>&1 \
        || echo "gpu.sh: mlx[cuda12] could not be installed here (no network?): mlx not run"
fi
if $PY -c "import mlx.core as mx; assert mx.default_device() == mx.gpu" 2>/dev/null; then
    timeout 150 $PY benchmarks/run.py --quick --backend mlx --timeout 120 --json "$OUT/gpu-mlx-quick.json" \
        2>&1 | tee "$OUT/gpu-mlx-quick.log"
fi
ls -la "$OUT"
