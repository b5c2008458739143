#!/usr/bin/env bash
# One run of the few-step speedrun (bench/fewstep): train NAME for 30 CPU-minutes with the adopted recipe plus the
# given train.py flags (one thread), keep a 15-minute snapshot, then score both with ShapesEval (full prompt set).
#   bash scripts/fewstep_job.sh NAME [train.py flags...]         a stopped run resumes: the same command again
#   HALF=1 bash scripts/fewstep_job.sh NAME [train.py flags...]  stop at the 15-minute snapshot and score it only
#                                                                (the same schedule; the command without HALF resumes it)
#   STEPS=N bash scripts/fewstep_job.sh NAME [train.py flags...] step-matched instead: N optimiser steps (the LR decays
#                                                                over them), a snapshot at N/2, both scored
set -uo pipefail
NAME=$1; shift
D=bench/fewstep/runs/$NAME
export OMP_NUM_THREADS=1
mkdir -p "$D"
if [ ! -f "$D/DONE" ] && ! { [ -n "${HALF:-}" ] && [ -f "$D/ckpt_15min.pt" ]; }; then
  if [ -f "$D/ckpt.pt" ]; then python train.py --out "$D" --resume >> "$D.log" 2>&1 &
  elif [ -n "${STEPS:-}" ]; then python train.py --out "$D" --max-steps "$STEPS" --max-minutes 0 --seed 0 --sample-every 0 \
    --snapshot-steps $((STEPS / 2)) "$@" > "$D.log" 2>&1 &
  else python train.py --out "$D" --max-minutes 30 --clock cpu --seed 0 --sample-every 0 --snapshots 15 "$@" > "$D.log" 2>&1 &
  fi
  PID=$!
  if [ -n "${HALF:-}" ]; then  # SIGTERM saves the run; it resumes from there
    while [ ! -f "$D/ckpt_15min.pt" ] && kill -0 $PID 2>/dev/null; do sleep 10; done
    kill -TERM $PID 2>/dev/null
  fi
  wait $PID && [ -z "${HALF:-}" ] && touch "$D/DONE"
fi
score() { [ -f "$D/$1" ] && [ ! -f "$D/$2/shapes_eval.json" ] && python evaluate.py --ckpt "$D/$1" --out "$D/$2" >> "$D.log" 2>&1; }
if [ -n "${STEPS:-}" ]; then
  [ -f "$D/DONE" ] && score ckpt.pt "eval${STEPS}steps"
  score "ckpt_$((STEPS / 2))steps.pt" "eval$((STEPS / 2))steps"
else
  [ -f "$D/DONE" ] && score ckpt.pt eval30
  score ckpt_15min.pt eval15
fi
echo "$NAME: scored $(ls -d "$D"/eval* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
