#!/bin/bash
# The GPU checks this project has not yet run, in one command of under 10 minutes (docs/REAL_MODELS.md,
# "GPU memory check"): the 0.5B preset's memory check at its full lengths (responses of 3072 tokens), the
# 7B preset's at 1024-token responses (4-bit NF4; the build and load of a 15 GB checkpoint take most of its
# time), then the tiny default for 3 steps on the GPU. Each stage runs under its own time limit, so one that
# fails or runs long leaves the others' results. Logs and each run's metrics.jsonl (per-phase step times)
# go to $OUT (default: gpu-checks/).
#
#   bash scripts/gpu_checks.sh                 needs requirements.txt's packages and one CUDA GPU
#   SITE=site.tar.xz bash scripts/gpu_checks.sh   unpacks a tarball of packages onto PYTHONPATH first
#                                              (for a machine without a package index)
set -u
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
T0=$(date +%s)
if [ -n "${SITE:-}" ]; then
  mkdir -p /tmp/site && tar xJf "$SITE" -C /tmp/site && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
{ date; nvidia-smi; nproc; free -g | head -2; df -h /tmp | tail -1
  $PY -c "import sys, torch, transformers, peft, bitsandbytes, math_verify; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
echo "environment ($(( $(date +%s) - T0 ))s): $(tail -1 "$OUT/env.txt")"

stage() {  # stage NAME SECONDS COMMAND...: the command's output in $OUT/NAME.txt, its measurements printed
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t ))s (limit ${limit}s; $(( $(date +%s) - T0 ))s in all)"
  grep -E "peak|after loading|planner|estimated|Error|error" "$OUT/$name.txt" | grep -v Warning | tail -14
  [ $rc -eq 0 ] || tail -3 "$OUT/$name.txt"
}

stage mem-0.5b 170 $PY scripts/gpu_memory_check.py --preset qwen2.5-0.5b --steps 1 --keep
cp /tmp/prime-gpu-mem-*/runs/gpu-memory-check/metrics.jsonl "$OUT/mem-0.5b-metrics.jsonl" 2>/dev/null
rm -rf /tmp/prime-gpu-mem-*
stage mem-7b 310 $PY scripts/gpu_memory_check.py --preset qwen2.5-math-7b --max-new-tokens 1024 --steps 1 --keep
cp /tmp/prime-gpu-mem-*/runs/gpu-memory-check/metrics.jsonl "$OUT/mem-7b-metrics.jsonl" 2>/dev/null
rm -rf /tmp/prime-gpu-mem-*
rm -rf /tmp/prime-gpu-tiny
stage tiny 60 $PY prime_mini.py --steps 3 --eval-n 50 --eval-samples 1 --reward-pages 0 --save-every 0 \
  --run-name gpu-tiny --out-dir /tmp/prime-gpu-tiny
cp /tmp/prime-gpu-tiny/gpu-tiny/metrics.jsonl "$OUT/tiny-metrics.jsonl" 2>/dev/null
tail -5 "$OUT/tiny.txt"
