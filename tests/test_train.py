"""The whole: train a few steps, kill, resume, sample, evaluate; checkpoints round-trip and refuse foreign files."""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import golden
import levers
import losses
import train
from conftest import SMALL as FLAGS, ckpt_step, cli, spawn, spawn_signalled

SMALL = [*FLAGS, "--batch-size", "32"]


def run(script, *args, check=True):
    """`python SCRIPT ARGS`, in this process (conftest.cli); check: a non-zero exit fails the test."""
    r = cli(script.removesuffix(".py"), *args)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.mark.slow  # the SIGTERM test in test_faults.py checks exact resume in the default run
def test_kill_resume_is_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    steps = ["--max-steps", "12", "--ckpt-every", "3"]
    r = spawn("train.py", *SMALL, *steps, "--out", a, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    # the same run, killed (SIGKILL: no chance to clean up) right after its checkpoint at step 6, then resumed
    p = spawn_signalled(signal.SIGKILL, 6, *SMALL, *steps, "--out", b, on="save")
    assert p.returncode == -signal.SIGKILL
    ck = os.path.join(b, "ckpt.pt")
    assert ckpt_step(ck) == 6
    r = spawn("train.py", "--resume", "--out", b, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "done: 12 steps" in r.stdout
    A = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    B = torch.load(ck, weights_only=True)
    assert A["step"] == B["step"] == 12
    for key in ("model", "ema"):
        for name, tensor in A[key].items():
            assert torch.allclose(tensor, B[key][name], atol=1e-6), f"{key}.{name} differs after resume"


def test_log_sample_and_evaluate_a_run(tmp_path, tiny_ckpt):
    # the log has the loss parts and per-time-bin losses; the checkpoint has plain parameter names
    rec = json.loads(open(os.path.join(os.path.dirname(tiny_ckpt), "log.jsonl")).readline())
    assert {"data", "self", "fake", "data_t0", "data_t3", "img_per_s", "lr", "tau"} <= set(rec)
    A = torch.load(tiny_ckpt, weights_only=True)
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in A["model"])
    # sample at 1 and 4 steps; never overwrite
    out = str(tmp_path / "grid.png")
    r = run("sample.py", "--ckpt", tiny_ckpt, "--steps", "1", "4", "--n", "1", "--prompt", "a red circle", "--out", out)
    from PIL import Image
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (16 + 1 * (128 + 2), 200 + 2 * (128 + 2), 3)          # 1 prompt x (1 and 4 steps), 4x tiles
    tiles = [grid[16:144, 200 + j * 130: 328 + j * 130] for j in range(2)]
    assert all(t.std() > 1 for t in tiles)                                      # drawn, not blank
    r = run("sample.py", "--ckpt", tiny_ckpt, "--steps", "1", "--n", "1", "--prompt", "a red circle", "--out", out)
    assert os.path.exists(str(tmp_path / "grid-1.png")) and "exists" in r.stdout
    # evaluate the checkpoint at two step counts: a table, a JSON and a plot
    r = run("evaluate.py", "--ckpt", tiny_ckpt, "--steps", "1", "2", "--per-task", "2", "--n", "1",
            "--out", str(tmp_path))
    rows = json.load(open(tmp_path / "shapes_eval.json"))["rows"]
    assert set(rows) == {"1", "2"}
    for row in rows.values():  # overall is the unweighted mean of the six tasks, each a fraction of 2 images
        tasks = [row[t] for t in data.TASKS]
        assert row["overall"] == pytest.approx(sum(tasks) / 6) and all(v in (0, 0.5, 1) for v in tasks)
        assert row["swd"] > 0
    assert os.path.exists(tmp_path / "shapes_eval.png")


def test_refuses_to_clobber_and_explains(tmp_path, tiny_ckpt):
    shutil.copytree(os.path.dirname(tiny_ckpt), tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    r = run("train.py", *SMALL, "--max-steps", "2", "--out", str(tmp_path), check=False)
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert r.returncode != 0 and "--resume" in r.stderr
    r = run("train.py", "--resume", "--out", str(tmp_path / "empty"), check=False)
    assert r.returncode != 0 and "no " in r.stderr


def test_sample_without_or_with_a_foreign_checkpoint(tmp_path):
    r = run("sample.py", "--ckpt", str(tmp_path / "none.pt"), check=False)
    assert r.returncode != 0 and "python train.py" in r.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    r = run("sample.py", "--ckpt", str(junk), check=False)
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    r = run("sample.py", "--ckpt", str(tmp_path / "foreign.pt"), check=False)
    assert r.returncode != 0 and "not a checkpoint of this project" in r.stderr


def test_flow_method_and_fake_term_run(tmp_path):
    run("train.py", *SMALL, "--max-steps", "2", "--batch-size", "4", "--method", "flow", "--out", str(tmp_path / "f"))
    run("train.py", *SMALL, "--max-steps", "4", "--batch-size", "8", "--fake-start", "0.25", "--out", str(tmp_path / "k"))
    recs = [json.loads(l) for l in open(tmp_path / "k" / "log.jsonl")]
    assert recs[-1]["fake_on"] and recs[-1]["fake"] > 0
    cfg = torch.load(tmp_path / "f" / "ckpt.pt", weights_only=True)["config"]
    assert cfg["method"] == "flow"


@pytest.mark.parametrize("flags, cls", [(["--method", "flow"], losses.FlowMatching), ([], losses.SelfE),
                                        (["--method", "meanflow"], losses.MeanFlow),
                                        (["--flow-target", "0.25"], levers.Levers), (["--shortcut", "0.25"], levers.Levers),
                                        (["--flow-target", "0.25", "--flow-t", "one"], levers.Levers)])
def test_each_method_flag_builds_its_object_and_its_jumps(flags, cls):
    """--method picks the method object, a lever flag the paper's Self-E plus levers.Levers; flow matching never
    jumps (s = t), the others do, and --flow-target draws its share of the jumps at s = 0."""
    args = train.get_args([*flags, "--out", "unused"])
    env = train.Env(False, 0, 1, 0, "cpu", None)
    tok = lambda captions: torch.zeros(len(captions), args.max_text_len, dtype=torch.long)
    tok.vocab_size = 64
    model, ema, _, gen = train.make_model(args, env, tok, None)
    method, net = train.make_method(args, env, tok, model, ema, gen)
    assert type(method) is cls and net is model
    t, s, jump = method.times(64, 0.9)
    moved = (s < t).nonzero().flatten()
    assert (len(jump) == 0 and torch.equal(s, t)) if cls is losses.FlowMatching else len(moved) > 0
    assert set(moved.tolist()) <= set(jump.tolist())
    assert ((s[jump] == 0).sum() >= 4) == ("--flow-target" in flags)   # a quarter of the 32 jumps at s = 0
    from_one = t[jump][s[jump] == 0] == 1 - 1e-3                        # --flow-t one: all of them from t = 1
    assert (from_one.all() and len(from_one) >= 4) == ("--flow-t" in flags)


@pytest.mark.parametrize("method", [pytest.param(m, marks=[] if m == "selfe" else pytest.mark.slow)
                                    for m in golden.METHODS])
@pytest.mark.skipif(torch.cuda.is_available(), reason="the fingerprints are CPU float numbers (CUDA kernels differ)")
def test_training_matches_the_golden_fingerprints(tmp_path, method):
    """6 seeded steps give the weights tests/golden.json holds (made by tests/golden.py): a refactor that
    changes one random draw or one term fails here. The tolerance allows for other CPUs' float kernels and
    is far below what one changed draw does (eps and eps' drawn in swapped order move the sum by ~0.9)."""
    want = json.load(open(golden.PATH))[method]
    got = golden.train_and_fingerprint(method, str(tmp_path / method))
    for which in ("model", "ema"):
        assert got[which] == pytest.approx(want[which], abs=2e-3), (which, got[which])


class TickingClock:
    """train.py's `time` module with a clock that moves one second per reading: the budget clock passes a
    snapshot's minute mark after a known number of readings, on any machine speed."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        self.now += 1.0
        return self.now

    process_time = time


def test_snapshots_keep_copies_along_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(train, "time", TickingClock())
    run("train.py", *SMALL, "--max-steps", "30", "--batch-size", "4", "--snapshots", "0.1", "--snapshot-steps", "7",
        "--out", str(out))
    snap = torch.load(out / "ckpt_0.1min.pt", weights_only=True)
    final = torch.load(out / "ckpt.pt", weights_only=True)
    assert 0 < snap["step"] < final["step"] == 30 and snap["elapsed"] >= 0.1 * 60
    by_step = torch.load(out / "ckpt_7steps.pt", weights_only=True)   # step-matched curves: after step 7 exactly
    assert by_step["step"] == 7 and by_step["elapsed"] < final["elapsed"]


def test_exported_weights_are_small_and_sample_like_the_checkpoint(tmp_path, tiny_ckpt):
    import model as models
    import sample
    out = Path(os.path.dirname(tiny_ckpt))
    ck = models.load_checkpoint(str(out / "ckpt.pt"))
    models.export_weights(ck, str(tmp_path / "ship.pt"))
    assert os.path.getsize(tmp_path / "ship.pt") < os.path.getsize(out / "ckpt.pt") / 4   # EMA only, fp16
    images = {}
    for path in (out / "ckpt.pt", tmp_path / "ship.pt"):
        net, tok, cfg = sample.load(str(path))
        assert next(net.parameters()).dtype == torch.float32
        torch.manual_seed(0)
        images[path] = sample.make_generate(net, tok, cfg)(["a red circle"] * 4, 2)
    a, b = images.values()
    assert (a - b).abs().max() < 0.02                      # fp16 weights: the same samples, to rounding
    os.replace(tmp_path / "ship.pt", tmp_path / "ckpt.pt")
    r = run("train.py", "--resume", "--out", str(tmp_path), check=False)
    assert r.returncode != 0 and "exported weights only" in r.stderr and "Traceback" not in r.stderr


def test_sample_uses_the_shipped_weights_only_without_a_run_and_says_which(tmp_path, monkeypatch, capsys, tiny_ckpt):
    import sys as _sys
    import model as models
    import sample
    shutil.copytree(os.path.dirname(tiny_ckpt), tmp_path / "runs" / "shapes")
    ck = models.load_checkpoint(str(tmp_path / "runs" / "shapes" / "ckpt.pt"))
    models.export_weights(ck, str(tmp_path / "shipped.pt"))
    monkeypatch.setattr(sample, "SHIPPED_CKPT", str(tmp_path / "shipped.pt"))
    work = tmp_path / "newcomer"
    work.mkdir()
    monkeypatch.chdir(work)                               # no runs/shapes here: the shipped weights
    monkeypatch.setattr(_sys, "argv", ["sample.py", "--prompt", "a red circle", "--n", "1", "--out", "a.png"])
    sample.main()
    assert "using the shipped weights" in capsys.readouterr().out and os.path.exists(work / "a.png")
    monkeypatch.chdir(tmp_path)                           # runs/shapes/ckpt.pt here: the user's own run
    sample.main()
    assert "using your run: runs/shapes/ckpt.pt" in capsys.readouterr().out
