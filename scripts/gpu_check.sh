#!/usr/bin/env bash
# The device check in one call (sized for 8 minutes on one GPU, start-up included: a 120 s test budget, 150 steps,
# compile where the GPU path compiles; never timed on a GPU yet; safe to run twice on a warm machine):
#   bash scripts/gpu_check.sh          on a CUDA machine: OUT=DIR for the logs (default $OUT, else /tmp/gpu_check)
#   bash scripts/gpu_check.sh --cpu    the same steps on a CPU, tiny and short: a dry run of this script itself
# Each check prints PASS or FAIL with its log; summary.txt lists them all, with the commit, torch and the device.
#   1. the test suite: every failure named (-rfE), a per-test time-out where pytest-timeout is there, and a
#      SIGINT at the time limit, so that pytest still prints its summary; pytest-xdist only if installed
#   2. the loader alone (images/s of the shapes DataLoader), then training, so loader-bound and GPU-bound differ
#   3. Self-E (as shipped: --flow-target 0.25) and MeanFlow on `small` with torch.compile + bf16: images/s, peak
#      memory, first-step (compile) time, and the number of recompiles (TORCH_LOGS=recompiles)
#   4. SIGTERM after step N, resume, against a straight run: max parameter difference (0 = bit for bit; tolerance
#      1e-3 where compiled or CUDA kernels are not deterministic: the CPU dry run gave 1.5e-11 with compile + bf16)
#   5. flow matching under torchrun (NCCL), and the CC3M path on img2dataset-shaped shards made here
set -u
CPU=0; [ "${1:-}" = "--cpu" ] && CPU=1
OUT=${OUT:-/tmp/gpu_check}; export PYTHONUNBUFFERED=1
W=$(mktemp -d /tmp/gpu_check_work.XXXXXX)           # fresh run folders every call: no old ckpt.pt is ever met
mkdir -p "$OUT"; rm -f "$OUT"/*.log "$OUT"/summary.txt
if [ $CPU = 1 ]; then MODEL=(--model tiny); BS=8; STEPS=6; TEST_LIMIT=60; TESTS=(tests/test_math.py)
else MODEL=(--model small); BS=${BS:-256}; STEPS=${STEPS:-150}; TEST_LIMIT=${TEST_LIMIT:-120}; TESTS=(); fi
RUN=(--batch-size $BS --max-minutes 0 --sample-every 0 --ckpt-every 100000 --log-every 25)
[ $CPU = 1 ] && RUN+=(--precision bf16 --compile --log-every 2)   # the GPU path's flags, on a CPU
{ echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "$(nproc) CPU cores"; } > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"; cp "$OUT/info.txt" "$OUT/summary.txt"

check() {  # check NAME COMMAND...: run it, log it, PASS/FAIL into summary.txt
  local name=$1; shift; local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  local verdict=$([ $rc = 0 ] && echo PASS || echo "FAIL (rc $rc)")
  echo "$name: $verdict in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  grep -v "step/s\]\|it/s\]" "$OUT/$name.log" | tail -6
}

echo "== 1. tests"
PYTEST=(python3 -m pytest -q -rfE -p no:cacheprovider --durations=10 "${TESTS[@]}")
python3 -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout 120)
python3 -c "import xdist" 2> /dev/null && [ $CPU = 0 ] && PYTEST+=(-n 4)
check tests timeout -s INT -k 20 $TEST_LIMIT "${PYTEST[@]}"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -40 >> "$OUT/summary.txt"

echo "== 2. the loader alone, then training"
check loader python3 - "$BS" <<'EOF'
import sys, time, torch
import data
bs = int(sys.argv[1])
workers = 4 if torch.cuda.is_available() else 0
it = iter(torch.utils.data.DataLoader(data.ShapesStream(0, bs, 32), batch_size=None, num_workers=workers))
next(it); t = time.time(); n = 20
for _ in range(n):
    next(it)
print(f"loader: {n * bs / (time.time() - t):.0f} images/s ({workers} workers, batch {bs}, 32 px shapes)")
EOF
SHIPPED=(--flow-target 0.25)   # Self-E as shipped: its flow target gives the teacher a batch of varying size
export TORCH_LOGS=recompiles    # every recompile is logged: counted below
for m in selfe meanflow; do
  check train_$m python3 train.py --method $m $([ $m = selfe ] && echo "${SHIPPED[@]}") "${MODEL[@]}" "${RUN[@]}" \
    --max-steps $STEPS --out "$W/$m"
  tail -1 "$W/$m/log.jsonl" 2> /dev/null >> "$OUT/summary.txt"
  echo "train_$m: $(grep -c "Recompiling function" "$OUT/train_$m.log") recompiles" | tee -a "$OUT/summary.txt"
done

echo "== 3. SIGTERM after step $((STEPS / 3)), resume, against the straight run"
HOOK=$(python3 -c "import sys; sys.path.insert(0, 'tests'); from conftest import SIGNAL_HOOK; print(SIGNAL_HOOK)")
sig_then_resume() {
  python3 -c "$HOOK" 15 $((STEPS / 3)) step "${SHIPPED[@]}" "${MODEL[@]}" "${RUN[@]}" --max-steps $STEPS --out "$W/sig"
  [ $? = 143 ] || { echo "the SIGTERM run did not stop with 143"; return 1; }
  python3 train.py --resume --out "$W/sig" || return 1
  python3 - "$W/selfe/ckpt.pt" "$W/sig/ckpt.pt" <<'EOF'
import sys, torch
a, b = (torch.load(p, weights_only=True, map_location="cpu") for p in sys.argv[1:])
d = max((a[k][n].float() - b[k][n].float()).abs().max().item() for k in ("model", "ema") for n in a[k])
print(f"max parameter difference after SIGTERM + resume: {d:.3g} ({'bit for bit' if d == 0 else 'tolerance 1e-3'})")
sys.exit(0 if d <= 1e-3 else 1)
EOF
}
check sigterm_resume sig_then_resume

echo "== 4. torchrun (NCCL on a GPU) and CC3M-shaped shards"
NPROC=$([ $CPU = 1 ] && echo 2 || echo 1)
check torchrun torchrun --standalone --nproc_per_node=$NPROC train.py --method flow "${MODEL[@]}" "${RUN[@]}" \
  --max-steps $((STEPS / 3 + 1)) --out "$W/ddp"
python3 - "$W/cc3m" <<'EOF'
import io, json, os, sys, tarfile
import numpy as np
from PIL import Image
os.makedirs(sys.argv[1], exist_ok=True)
for shard in range(2):  # img2dataset's webdataset layout: 0000N.tar of KEY.jpg, KEY.txt, KEY.json
    with tarfile.open(os.path.join(sys.argv[1], f"{shard:05d}.tar"), "w") as tar:
        for i in range(64):
            img = Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8))
            buf = io.BytesIO(); img.save(buf, "JPEG")
            for ext, payload in (("jpg", buf.getvalue()), ("txt", f"a photo of thing {i}".encode()),
                                 ("json", json.dumps({"key": f"{shard}{i:04d}"}).encode())):
                info = tarfile.TarInfo(f"{shard}{i:04d}.{ext}"); info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
EOF
check cc3m python3 train.py --dataset cc3m --data-dir "$W/cc3m" "${MODEL[@]}" "${RUN[@]}" --max-steps 4 \
  --sample-every 4 --no-compile --out "$W/cc3m_run"        # the data path, not the compiler: no second compile
cp "$W"/selfe/log.jsonl "$OUT/selfe_log.jsonl" 2> /dev/null; cp "$W"/meanflow/log.jsonl "$OUT/meanflow_log.jsonl" 2> /dev/null
rm -rf "$W"
echo "== summary ($OUT/summary.txt)"; cat "$OUT/summary.txt"
! grep -q "FAIL" "$OUT/summary.txt"
