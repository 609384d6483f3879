#!/bin/bash
# GPU checks and GPU benchmarks in one call of a lent device machine (see README, Development).
#
# Prepare here (CPU), before the call:
#   echo /.whl/ >> .git/info/exclude; echo /.devcarry/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl gguf highspy pulp
#   mkdir -p .devcarry/m && .venv/bin/python bench/profile_speed.py --save-matrices .devcarry/m/layers01.safetensors
# then run `bash bench/device_checks.sh` there with carry [".whl", ".devcarry/m"]. Everything it
# writes lands in $OUT (logs, reports/gpu_synthetic and reports/profile_speed_gpu to copy back).
# The timeouts keep the whole call under about 9 minutes.
export PYTHONUNBUFFERED=1
set -o pipefail
R=$(pwd)
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl || exit 1
export PYTHONPATH=/root/site:$R BITALLOC_CACHE=/root/cache HF_HUB_OFFLINE=1 NUMBA_CACHE_DIR=/root/numba PATH=/root/site/bin:$PATH
mkdir -p /root/site/bin && printf '#!/bin/sh\nexec python3 -m bitalloc.cli "$@"\n' > /root/site/bin/bitalloc && chmod +x /root/site/bin/bitalloc
nvidia-smi -L
python3 -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__, 'cuda', torch.cuda.is_available())"
date +%T; echo "== pytest -m gpu"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu -ra tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -8
date +%T; echo "== pytest, the whole suite with CUDA present"
timeout 170 python3 -m pytest -q -p no:cacheprovider -n 14 --timeout 100 -ra tests 2>&1 | tee "$OUT/pytest-all.log" | grep -v '^\.' | tail -15
date +%T; echo "== gpu_synthetic"
timeout 75 python3 bench/gpu_synthetic.py --out "$OUT/gpu_synthetic" 2>&1 | tail -10
date +%T; echo "== profile_speed on cuda"
timeout 220 python3 bench/profile_speed.py --device cuda --matrices .devcarry/m/layers01.safetensors --no-ablations \
  --noise-seeds '' --bitalloc-seeds '' --time-limit 170 --out "$OUT/profile_speed_gpu" 2>&1 | tee "$OUT/profile_speed.log" \
  | grep -v Loading | cut -c1-200 | tail -20
date +%T
