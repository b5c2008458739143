#!/usr/bin/env bash
# One run of the few-step speedrun (bench/fewstep): train NAME for $MIN CPU-minutes with the adopted recipe plus
# the given train.py flags (one thread), keep a 15-minute snapshot, then score both with ShapesEval (full set).
#   bash scripts/fewstep_job.sh NAME [train.py flags...]      (resumes a stopped run: the same command again)
set -euo pipefail
NAME=$1; shift
D=bench/fewstep/runs/$NAME; MIN=${MIN:-30}
export OMP_NUM_THREADS=1
if [ ! -f "$D/DONE" ]; then
  if [ -f "$D/ckpt.pt" ]; then python train.py --out "$D" --resume > "$D.log" 2>&1
  else python train.py --out "$D" --max-minutes "$MIN" --clock cpu --seed 0 --sample-every 0 --snapshots 15 "$@" > "$D.log" 2>&1; fi
  touch "$D/DONE"
fi
[ -f "$D/eval30/shapes_eval.json" ] || python evaluate.py --ckpt "$D/ckpt.pt" --out "$D/eval30" >> "$D.log" 2>&1
[ -f "$D/eval15/shapes_eval.json" ] || python evaluate.py --ckpt "$D/ckpt_15min.pt" --out "$D/eval15" >> "$D.log" 2>&1
echo "$NAME done"
