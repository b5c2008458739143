#!/usr/bin/env bash
# A few-step lever to its 15-minute snapshot only: the same 30-minute schedule as scripts/fewstep_job.sh up to
# there, so the snapshot compares with the other runs' 15-minute snapshots; the run is then stopped (SIGTERM
# saves it, and fewstep_job.sh with the same NAME would resume it to 30).
#   bash scripts/fewstep_half.sh NAME [train.py flags...]
set -uo pipefail
NAME=$1; shift
D=bench/fewstep/runs/$NAME
export OMP_NUM_THREADS=1
mkdir -p "$D"
python train.py --out "$D" --max-minutes 30 --clock cpu --seed 0 --sample-every 0 --snapshots 15 "$@" > "$D.log" 2>&1 &
PID=$!
while [ ! -f "$D/ckpt_15min.pt" ] && kill -0 $PID 2>/dev/null; do sleep 10; done
kill -TERM $PID 2>/dev/null; wait $PID
python evaluate.py --ckpt "$D/ckpt_15min.pt" --out "$D/eval15" >> "$D.log" 2>&1
echo "$NAME: 15-minute snapshot scored"
