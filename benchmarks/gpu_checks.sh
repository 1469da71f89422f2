#!/bin/bash
# The GPU measurements of the speed work (issue #21) in one go, for a lent GPU machine.
#
# The machine has torch but not this package, Torch-Pruning (pure Python) or the data. Here, once
# (.gitignore has /.gpu/):
#   mkdir -p .gpu/site && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/ &&
#   cp -r "$(.venv/bin/python -c 'import torch_pruning, os; print(os.path.dirname(torch_pruning.__file__))')" .gpu/site/
# then run `bash benchmarks/gpu_checks.sh` there with `.gpu` carried. Not yet run: eager, each
# DemP run took 1-1.5 min on an H100; compiling adds its own minutes, so give the call the
# full 10 minutes. Logs go to $OUT (or ./gpu_checks), one file per benchmark, as they run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_checks}
mkdir -p "$out"
export PYTHONPATH=src:.gpu/site PYTHONUNBUFFERED=1 DORMANT_DATA=${DORMANT_DATA:-$PWD/.gpu}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/device.txt"
fast="--compile reduce-overhead --precision bf16 --memory-format channels_last"
"$py" benchmarks/demp_speed.py --device cuda --epochs 10 --width 8 --reg-peak 0.005 $fast \
    2>&1 | tee "$out/demp_speed_w8.txt"
"$py" benchmarks/demp_speed.py --device cuda --epochs 10 --width 1 --reg-peak 0.01 $fast \
    2>&1 | tee "$out/demp_speed_w1.txt"
"$py" benchmarks/monitor_overhead.py --device cuda 2>&1 | tee "$out/monitor_overhead.txt"
