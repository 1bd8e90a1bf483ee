#!/usr/bin/env bash
# The whole GPU benchmark in one device call, every stage capped in time; results under $OUT.
#
#   on the GPU machine (carry .devkit):   bash bench/device_run.sh
#   here, a tiny rehearsal on the CPU:    QUICK=1 OUT=/tmp/devrun bash bench/device_run.sh
#
# Stages: (0) decode alone: torchvision's batched nvJPEG vs nvImageCodec's back-ends, progressive
# JPEGs among them (bench/decode_steps.py); (1) the device's batch steps alone: resize calls and
# ms per batch on uniform and mixed sizes, forward eager vs CUDA graphs alone and beside busy
# Python threads (bench/device_steps.py); (2) ResNet-50 fp16 end to end, one worker pool grown
# 1 -> 4 -> 8 processes on the one GPU (complete workers, the layout --processes-per-gpu makes),
# ImageNet-size, mixed-size and 12-MP sets at each size, with the in-process ceiling and idle
# latency; (3) the same at 8 processes with JPEGs decoded by nvImageCodec; (4) GPU fp16 vs CPU
# fp32 answers (GPU_CHECK=1; on by default in the QUICK rehearsal). Then summary.md. Each stage's JSON is rewritten
# after every measurement, so a stage cut short by its time cap still leaves what it measured.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?set OUT to the folder for results}"
QUICK=${QUICK:-0}
# Seconds for everything, set-up included; a stage starts only if its minimum still fits.
BUDGET=${BUDGET:-450}
IMAGES=${IMAGES:-/tmp/imgcls-bench-images}  # outside $OUT: images must not be sent back
T0=$SECONDS
# Only 8 files come back from $OUT: the logs travel as one archive, made at the end.
LOGS=${LOGS:-/tmp/imgcls-logs}
mkdir -p "$LOGS"
exec > >(tee -a "$OUT/device_run.log") 2>&1

# The GPU machine lacks Celery, redis-py, redis-server...: the carried kit brings them. Here
# they are installed, and the kit's set-up would clash with the shared Redis on 6379.
if [ -d .devkit ] && ! python3 -c 'import celery, redis, click, tenacity, prometheus_client' \
  2>/dev/null; then
  # shellcheck disable=SC1091
  source .devkit/setup.sh || { echo "devkit set-up failed"; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
command -v redis-server >/dev/null || { echo "no redis-server on PATH"; exit 1; }

{
  nvidia-smi || echo "no nvidia-smi"
  python3 -c 'import torch, torchvision, platform, os
print("python", platform.python_version(), "torch", torch.__version__, "torchvision",
      torchvision.__version__, "cuda", torch.version.cuda, "cpus", os.cpu_count())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only")'
  free -g | head -2
} 2>&1 | tee "$LOGS/machine.txt"
echo "== set-up done after $((SECONDS - T0)) s"

left() { echo $((BUDGET - (SECONDS - T0))); }

# stage NAME CAP MIN COMMAND...: run COMMAND for at most CAP seconds (less if the budget is
# nearly spent), or skip it when fewer than MIN seconds are left.
stage() {
  local name=$1 cap=$2 need=$3 remaining started
  shift 3
  remaining=$(left)
  if ((remaining < need)); then
    echo "== skip $name: ${remaining} s left, it needs ${need} s"
    return
  fi
  ((cap > remaining)) && cap=$remaining
  echo "== $name: at most ${cap} s ($(date +%T))"
  started=$SECONDS
  timeout -k 15 "$cap" "$@" 2>&1 | tee "$LOGS/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
}

# bench NAME CAP MIN ARGS...: a stage running python -m bench, into $OUT/NAME.json and its logs.
bench() {
  local name=$1 cap=$2 need=$3
  shift 3
  stage "$name" "$cap" "$need" python3 -m bench --label "$name" --out "$OUT/$name.json" \
    --image-dir "$IMAGES" --log-dir "$LOGS/$name" "$@"
}

if [ "$QUICK" = 1 ]; then
  big=mobilenet_v3_small scale=1,2 gpu=(--quick) check=(imagenet=4,12mp=1,mixed=4)
  steps=(--batch 8 --repeat 2 --busy 0,2) decode=(--batch 8 --repeat 2)
else
  big=resnet50 scale=1,4,8 gpu=(--precision fp16)
  check=(imagenet=64,12mp=8,mixed=64) steps=(--batch 256 --repeat 20 --busy 0,4)
  decode=(--batch 256 --repeat 10)
  # At least 8,000 jobs per measurement: shorter runs measure mostly the ramp.
  gpu+=(--e2e-min 8000)
fi

stage decode 45 20 python3 -m bench.decode_steps "${decode[@]}" --image-dir "$IMAGES" \
  --out "$LOGS/decode_steps.json"
stage device-steps 75 25 python3 -m bench.device_steps --model "$big" "${steps[@]}" \
  --image-dir "$IMAGES" --out "$LOGS/device_steps.json"
# The forward pass's CUDA graphs ran first in device-steps: where they failed, the end-to-end
# stages run eagerly rather than not at all (the log says which).
graphs=(--cuda-graphs)
if ! grep -q '"graphs_ms"' "$LOGS/device_steps.json" 2>/dev/null && [ "$QUICK" != 1 ]; then
  echo "== CUDA graphs did not run in device-steps: end to end without them"
  graphs=(--no-cuda-graphs)
fi
# One worker pool grown 1 -> 4 -> 8 processes on the one GPU, every image set at each size.
bench r50-e2e 210 90 --models "$big" --images imagenet,mixed,12mp --scale-out "$scale" \
  --stages ceiling,e2e,latency "${gpu[@]}" "${graphs[@]}"
# The same at the largest size with JPEGs decoded by the GPU's JPEG engines (nvImageCodec; CUDA
# only, so not in the rehearsal).
if [ "$QUICK" != 1 ]; then
  bench r50-e2e-nvimgcodec 80 50 --models "$big" --images imagenet,mixed,12mp \
    --scale-out "${scale##*,}" --stages e2e "${gpu[@]}" "${graphs[@]}" --jpeg-decoder nvimgcodec
fi
if [ "${GPU_CHECK:-$QUICK}" = 1 ]; then
  stage gpu-check 60 25 python3 -m bench.gpu_check --model "$big" --images "${check[@]}" \
    --image-dir "$IMAGES" --out "$OUT/gpu_check.json"
fi

mapfile -t results < <(ls "$OUT"/r50-*.json 2>/dev/null)
if ((${#results[@]})); then
  python3 -m bench.report "${results[@]}" | tee "$OUT/summary.md"
fi
if [ -f "$OUT/gpu_check.json" ]; then
  python3 -m bench.gpu_check --summarize "$OUT/gpu_check.json" | tee -a "$OUT/summary.md"
fi
for steps in decode_steps device_steps; do
  if [ -f "$LOGS/$steps.json" ]; then
    { echo; echo "bench/$steps.py:"; echo '```'; cat "$LOGS/$steps.json"; echo '```'; } |
      tee -a "$OUT/summary.md"
  fi
done
tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
echo "== device_run done after $((SECONDS - T0)) s"
