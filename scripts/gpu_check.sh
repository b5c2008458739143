#!/usr/bin/env bash
# The GPU checklist in one call (device tool, ~8 minutes): the test suite on a CUDA machine, Self-E on `small`
# with torch.compile + bf16 (img/s, peak memory, compile time, recompiles), flow matching under
# torchrun --nproc_per_node=1 on NCCL, and both scored with ShapesEval (a small GPU-scale benchmark).
# Usage: OUT=/tmp/gpu bash scripts/gpu_check.sh   (writes logs and JSON to $OUT)
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
MIN=${MIN:-2}; BS=${BS:-256}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
  nproc; } > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"
echo "== tests"; t0=$(date +%s)
timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 > "$OUT/pytest.log" 2>&1; echo "pytest rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/pytest.log"
tail -25 "$OUT/pytest.log"
echo "== selfe small, compile + bf16, $MIN min"
TORCH_LOGS=recompiles timeout 240 python3 train.py --model small --batch-size $BS --max-minutes $MIN --out /tmp/g_selfe \
  --sample-every 0 --ckpt-every 100000 > "$OUT/train_selfe.log" 2>&1; echo "rc $?"
grep -v "step/s\]" "$OUT/train_selfe.log" | tail -12; tail -2 /tmp/g_selfe/log.jsonl
echo "== flow small under torchrun (NCCL), $MIN min"
TORCH_LOGS=recompiles timeout 240 torchrun --standalone --nproc_per_node=1 train.py --method flow --model small --batch-size $BS \
  --max-minutes $MIN --out /tmp/g_flow --sample-every 0 --ckpt-every 100000 > "$OUT/train_flow.log" 2>&1; echo "rc $?"
grep -v "step/s\]" "$OUT/train_flow.log" | grep -iv "warn" | tail -12; tail -2 /tmp/g_flow/log.jsonl
cp /tmp/g_selfe/log.jsonl "$OUT/selfe_log.jsonl"; cp /tmp/g_flow/log.jsonl "$OUT/flow_log.jsonl"
echo "== ShapesEval (10 prompts per task x 4 images)"
for m in selfe flow; do
  timeout 60 python3 evaluate.py --ckpt /tmp/g_$m/ckpt.pt --per-task 10 --n 4 --out /tmp/g_eval_$m 2>&1 | tail -4
  cp /tmp/g_eval_$m/*.json "$OUT/eval_$m.json" 2>/dev/null
done
ls "$OUT"
