"""Every command README.md shows runs, from a fresh copy of the repository (its tracked files only), with a tiny
budget appended. A command that README adds, drops or changes without this table fails the first test, so README
cannot drift from the code again."""
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, rgb, encode, write_tar

TINY = ["--max-steps", "2", "--max-minutes", "0", "--batch-size", "4", "--sample-every", "0"]
# README's command -> (what is appended to it, or None: not run here, and why)
COMMANDS = {
    "pip install -r requirements.txt && python train.py": (TINY, "the pip half is CI's install step"),
    "python -m pytest -q": (None, "this is the test suite itself"),
    "python sample.py --steps 1 2 4 8 50": ([], ""),
    "python evaluate.py --ckpt runs/shapes/ckpt.pt --steps 1 2 4 8 50": (["--per-task", "1", "--n", "1"], ""),
    "python train.py --method flow": (TINY, ""),
    "python train.py --method meanflow": (TINY, ""),
    "python train.py --resume": (["--max-steps", "3"], ""),
    "python -m scripts.ship": (["--max-steps", "2", "--out", "runs/ship", "--dest", "runs/ship/w.pt", "--results",
                                "runs/ship/r.json", "--per-task", "1", "--steps", "1"], ""),
    "python -m scripts.benchmark --curves --minutes 120 --snapshots 15 30 60 --jobs 2": ([], ""),
    "python sample.py --steps 1 2 4 8 50 --n 2 --prompt \"a red circle\" --prompt \"a blue triangle and a yellow "
    "circle\" --prompt \"a square left of a circle\" --prompt \"three circles\"": (["--ckpt",
                                                                                   "checkpoints/shapes_tiny_selfe.pt"], ""),
    "python train.py --dataset cc3m --data-dir /data/cc3m --model small": (
        ["--max-steps", "1", "--max-minutes", "0", "--batch-size", "2", "--sample-every", "0", "--out", "runs/cc3m"],
        "on shards this test makes in /data/cc3m's place"),
    "torchrun --standalone --nproc_per_node=8 train.py --dataset cc3m --data-dir /data/cc3m --model base":
        (None, "8 GPUs; tests/test_scale.py runs torchrun with 2 CPU processes"),
}


def readme_commands():
    """The lines of README's ```bash blocks, without their comments (a trailing \\ joins lines)."""
    cmds, block, text = [], False, open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if block and line.strip():
            cmd = line.split(" #")[0].strip()
            cmds.append(" ".join(cmd.split()))
    return cmds


def test_every_readme_command_is_in_the_table():
    cmds = readme_commands()
    assert cmds, "README has no ```bash block"
    missing = [c for c in cmds if c not in COMMANDS]
    assert not missing, f"README commands this check does not know (add them to COMMANDS): {missing}"
    stale = [c for c in COMMANDS if c not in cmds]
    assert not stale, f"commands no longer in README (drop them from COMMANDS): {stale}"


@pytest.mark.slow  # ~2 minutes: every command, each a fresh process
def test_every_readme_command_runs_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(clone / os.path.dirname(f), exist_ok=True)
            with open(os.path.join(ROOT, f), "rb") as src, open(clone / f, "wb") as dst:
                dst.write(src.read())
    shards = tmp_path / "cc3m"
    shards.mkdir()
    write_tar(shards / "00000.tar", [m for i in range(8) for m in (
        (f"{i:05d}.jpg", encode(rgb(i, (80, 60)), "JPEG")), (f"{i:05d}.txt", f"a photo of thing {i}".encode()))])
    before = (clone / "bench" / "curves" / "results.json").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for cmd in readme_commands():  # in README's order: train, then what reads its run
        extra, why = COMMANDS[cmd]
        if extra is None:
            continue
        if cmd.startswith("pip install"):
            cmd = cmd.split("&&", 1)[1]
        argv = [a.replace("/data/cc3m", str(shards)) for a in shlex.split(cmd)] + extra
        argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
        r = subprocess.run(argv, cwd=clone, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, f"{cmd!r} failed ({why}):\n{r.stdout[-1500:]}\n{r.stderr[-2500:]}"
    assert (clone / "bench" / "curves" / "results.json").read_bytes() == before   # the benchmark wrote nothing
    assert os.path.exists(clone / "runs" / "ship" / "w.pt") and os.path.exists(clone / "samples.png")
