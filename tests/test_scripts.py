"""scripts/: the paper's claims are judged right, and runs train two at a time, one core each, and resume."""
import argparse
import os
import subprocess

import pytest

from scripts import benchmark

from conftest import ROOT  # noqa: E402


def rows(scores):
    return {str(k): {"overall": v} for k, v in zip(benchmark.STEPS, scores)}


def test_targets_pass_and_miss_where_they_should():
    good = {"eval": {"selfe": rows([0.50, 0.62, 0.64, 0.65, 0.66]), "flow": rows([0.05, 0.25, 0.55, 0.62, 0.67])}}
    verdicts = [v[-1] for v in benchmark.targets(good).values()]
    assert verdicts == [True, True, True, True, True, True]
    bad = {"eval": {"selfe": rows([0.20, 0.30, 0.27, 0.40, 0.44]), "flow": rows([0.05, 0.16, 0.30, 0.40, 0.47])}}
    verdicts = {k: v[-1] for k, v in benchmark.targets(bad).items()}
    # 0.30 < 2 x 0.16; 0.30 < 0.9 x 0.44; 0.44 < 0.47 - 0.02; 0.30 -> 0.27 is a drop of 0.03; 0.20 < 0.7 x 0.44
    assert not any(verdicts.values()), verdicts


def test_two_runs_at_a_time_one_thread_each_then_cached(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    events, real_popen = [], subprocess.Popen

    class Recorder(real_popen):
        def __init__(self, cmd, env=None, **kw):
            name = os.path.basename(cmd[cmd.index("--out") + 1])
            events.append(("start", name, (env or {}).get("OMP_NUM_THREADS")))
            self.name = name
            super().__init__(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)

        def wait(self, *a, **kw):
            events.append(("wait", self.name, None))
            return super().wait(*a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    args = argparse.Namespace(out=str(tmp_path), jobs=2, minutes=5.0, seed=0,
                              train_args="--max-steps 2 --batch-size 8 --log-every 1 --ckpt-every 1")
    out = benchmark.train(["flow", "selfe"], args)
    # both start before the first is waited on, each with one thread (2 cores / 2 jobs)
    assert events == [("start", "flow", "1"), ("start", "selfe", "1"), ("wait", "flow", None),
                      ("wait", "selfe", None)]
    assert out["flow"]["steps"] == out["selfe"]["steps"] == 2
    assert all(os.path.exists(tmp_path / "runs" / n / "DONE") for n in ("flow", "selfe"))
    events.clear()
    again = benchmark.train(["flow", "selfe"], args)  # finished runs are not trained again
    assert events == [] and again == out


def test_each_claim_judged_at_each_budget_and_its_first():
    curves = {"curve_selfe": {"15": rows([0.02, 0.03, 0.03, 0.03, 0.05]), "30": rows([0.10, 0.30, 0.31, 0.32, 0.33]),
                              "60": rows([0.30, 0.50, 0.52, 0.55, 0.56])},
              "curve_flow": {"15": rows([0.0, 0.0, 0.02, 0.03, 0.04]), "30": rows([0.05, 0.20, 0.30, 0.33, 0.34]),
                             "60": rows([0.05, 0.20, 0.40, 0.50, 0.55])}}
    claims = benchmark.claims_by_budget(curves, [15, 30, 60])
    first = {k: v["first"] for k, v in claims.items()}
    assert first["selfe@2 >= 2 x flow@2"] == "60"        # 0.30 < 2 x 0.20 at 30; 0.50 >= 0.40 at 60
    assert first["selfe@2 >= 0.9 x selfe@50"] == "30"    # 15 holds too, but Self-E draws nothing there (< 0.1)
    assert first["selfe@50 >= flow@50 - 0.02"] == "30"
    assert first["selfe@8 >= 0.6"] is None
    assert claims["selfe@2 >= 2 x flow@2"]["at"] == {"15": None, "30": False, "60": True}
    assert claims["selfe@50 >= flow@50 - 0.02"]["at"] == {"15": None, "30": True, "60": True}
    assert not any("meanflow" in k for k in claims)                          # no MeanFlow curve: no claim
    curves["curve_meanflow"] = {"30": rows([0.15, 0.25, 0.3, 0.3, 0.3]), "60": rows([0.2, 0.4, 0.5, 0.5, 0.5])}
    claims = benchmark.claims_by_budget(curves, [15, 30, 60])
    assert claims["selfe@1 >= meanflow@1"]["at"] == {"30": False, "60": True}   # 0.10 < 0.15; 0.30 >= 0.2; none at 15
    assert claims["selfe@2 >= meanflow@2"]["at"] == {"30": True, "60": True}
    curves["curve_selfe_fake_late"] = {"60": rows([0.35, 0.45, 0.5, 0.5, 0.5])}   # the paper's fake term, late
    claims = benchmark.claims_by_budget(curves, [15, 30, 60])
    assert claims["late fake term helps: selfe_fake_late@1 > selfe@1"]["at"] == {"60": True}     # 0.35 > 0.30
    assert claims["late fake term helps: selfe_fake_late@2 > selfe@2"]["at"] == {"60": False}    # 0.45 < 0.50


def test_match_steps_trains_to_the_committed_curves_steps(tmp_path, monkeypatch):
    """--curves --match-steps: a curve made on another machine is matched by optimiser steps, not minutes."""
    import train
    cmds = []

    class Fake:
        def __init__(self, cmd, env=None, **kw):
            cmds.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Fake)
    monkeypatch.setattr(benchmark.runs, "summary", lambda out: {})
    (tmp_path / "runs" / "curve_selfe_fake_late").mkdir(parents=True)
    args = argparse.Namespace(out=str(tmp_path), jobs=1, minutes=120.0, snapshots=[15.0, 30.0], seed=0, train_args="",
                              steps_at={15.0: 2967, 30.0: 5877, 120.0: 24206})
    benchmark.train(["curve_selfe_fake_late"], args)
    a = train.get_args(cmds[0][2:])
    assert (a.max_steps, a.max_minutes, a.snapshot_steps, a.fake_start) == (24206, 0.0, [2967, 5877], 0.775)


def test_every_search_config_is_a_valid_train_command_and_the_baseline_is_pinned():
    from scripts import search
    import train
    base = train.get_args(search.BASELINE)
    assert (base.arch["patch"], base.optimizer, base.lr) == (4, "adam", 1e-3)  # 'base', whatever the defaults
    for name, flags in search.CONFIGS.items():
        args = train.get_args([*search.BASELINE, *flags])        # later flags override BASELINE's
        changed = {k for k in vars(args) if k not in ("given", "arch") and getattr(args, k) != getattr(base, k)}
        changed |= {f"arch.{k}" for k in args.arch if args.arch[k] != base.arch.get(k)}
        assert changed or name == "base", f"{name} changes nothing"


def test_shipped_weights_are_fp16_only_when_no_score_moves(tmp_path):
    import torch
    import model as models
    from scripts import ship
    net = models.build("tiny", vocab_size=30, max_text_len=8, image_size=32)
    ck = dict(ema=net.state_dict(), config={"model": "tiny"}, tokenizer="{}", step=7, elapsed=60.0)
    fp32 = [0.10, 0.20, 0.30, 0.40, 0.50]
    for shift, want in ((0.005, "fp16"), (0.03, "fp32")):
        def fake_score(path):  # fp16 weights move every score by `shift`
            half = any(v.dtype == torch.float16 for v in torch.load(path, weights_only=True)["ema"].values())
            return rows([v + shift * half for v in fp32])
        path = tmp_path / want / "ship.pt"
        entry = ship.export(ck, rows(fp32), str(path), fake_score)
        assert entry["dtype"] == want and path.exists() and entry["step"] == 7
        assert entry["max_diff_vs_fp32"] == pytest.approx(shift if want == "fp16" else 0.0)


def test_nothing_but_scripts_ship_writes_checkpoints():
    """The shipped file has one maker: no other script names the shipped path or checkpoints/ for writing."""
    for name in os.listdir(os.path.join(ROOT, "scripts")):
        if name.endswith((".py", ".sh")) and name != "ship.py":
            text = open(os.path.join(ROOT, "scripts", name)).read()
            assert "SHIPPED_CKPT" not in text and "export_weights" not in text, name


def test_benchmark_in_a_fresh_clone_changes_no_committed_file(tmp_path):
    """README's curves command with every number already committed: it says so, writes nothing, and exits 0."""
    import shutil
    import subprocess
    import sys
    work = tmp_path / "clone"
    shutil.copytree(os.path.join(ROOT, "bench", "curves"), work / "bench" / "curves",
                    ignore=shutil.ignore_patterns("runs"))
    before = (work / "bench" / "curves" / "results.json").read_bytes()
    r = subprocess.run([sys.executable, "-m", "scripts.benchmark", "--curves", "--minutes", "120", "--snapshots", "15",
                        "30", "60", "--jobs", "2", "--out", str(work / "bench" / "curves")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nothing to train or score" in r.stdout
    assert (work / "bench" / "curves" / "results.json").read_bytes() == before


@pytest.mark.slow  # 14 s: a full evaluation of the shipped file
def test_shipped_weights_reproduce_the_committed_scores_at_1_and_2_steps():
    """checkpoints/shapes_tiny_selfe.pt, scored as README says (`evaluate.py --ckpt <it>`), gives the numbers
    in bench/shipped/results.json["shipped"] within 0.01 (the 1- and 2-step rows: 50 steps would take minutes)."""
    import json
    import evaluate
    import sample
    shipped = json.load(open(os.path.join(ROOT, "bench", "shipped", "results.json")))["shipped"]
    net, tok, cfg = sample.load(os.path.join(ROOT, shipped["path"]))
    assert cfg["method"] == "selfe" and net.training is False
    rows = evaluate.evaluate(sample.make_generate(net, tok, cfg), [1, 2], 50, 4, cfg["image_size"], seed=0)
    for k in ("1", "2"):
        assert abs(rows[k]["overall"] - shipped["rows"][k]["overall"]) <= 0.01, (k, rows[k], shipped["rows"][k])


@pytest.mark.slow  # a fresh interpreter and three training steps
def test_the_memory_probe_runs_in_a_fresh_process():
    """benchmark.peak_memory starts `python -c` from the repository root (the module lives in scripts/): a
    training step of the tiny model at batch 64 raises the peak by some MB."""
    assert benchmark.peak_memory("flow") > 1


def test_lastjump_probe_reads_zero_for_a_jump_that_is_the_flow_head(tiny_ckpt, monkeypatch):
    """scripts.diagnose --lastjump: a network whose jump ignores s (the last jump IS the flow prediction, as the
    paper's Self-E learns at convergence) reads last_vs_flow 0; the trained tiny run's jump does not. The first
    jump finished by K flow steps costs 1 + K network calls per image."""
    import model as models
    from scripts import diagnose
    ckpt = models.load_checkpoint(tiny_ckpt)
    real = diagnose.lastjump(ckpt, per_task=1, n=1, K=(2, 4), batch=32)
    assert real["last_vs_flow"] > 0 and real["posterior_spread"] > 0
    assert real["left_the_mean"] == real["last_vs_flow"] / real["posterior_spread"]
    assert set(real["first_jump_then"]) == {"2", "4"}
    sweep = real["s_sweep"]
    assert list(sweep) == [str(f) for f in diagnose.S_FRACS] and sweep["0.0"]["cond_vs_last"] == 0
    assert sweep["0.0"]["jump_vs_ode"] == pytest.approx(real["last_vs_teacher"])      # s = 0: the last jump itself
    assert all(r["cond_vs_last"] > 0 for f, r in sweep.items() if f != "0.0") and real["cond_flow_vs_last"] > 0
    build, calls = models.from_checkpoint, []

    def flat(*a, **k):  # the same network with s replaced by t: every jump is the flow head
        net = build(*a, **k)
        forward = net.forward
        net.forward = lambda x, t, s, ids: calls.append(len(x)) or forward(x, t, t, ids)
        return net
    monkeypatch.setattr(diagnose.models, "from_checkpoint", flat)
    res = diagnose.lastjump(ckpt, per_task=1, n=1, K=(), batch=32)
    assert res["last_vs_flow"] == 0 and res["left_the_mean"] == 0
    assert res["teacher_vs_flow"] > 0 and res["last_vs_teacher"] == pytest.approx(res["teacher_vs_flow"])
    assert all(abs(r["learned"]) < 1e-4 for r in res["s_sweep"].values())    # no jump has left its Euler step
    calls.clear()
    tok = diagnose.data.Tokenizer(ckpt["tokenizer"], ckpt["config"]["max_text_len"])
    diagnose.first_jump_then(flat(ckpt, tok.vocab_size), tok, ckpt["config"], 4)(["a red circle"] * 3, 2)
    assert calls == [3] * 5
