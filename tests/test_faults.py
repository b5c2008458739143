"""No hang, no lost work: data that yields nothing, interrupted and diverging runs, failing saves, bad flags.

A run that could hang (bad data, signals, the command line itself) is a subprocess with a time-out: code that
hangs fails the test instead of stalling CI. The rest run in this process (conftest.cli)."""
import json
import os
import shutil
import signal

import pytest
import torch

import data
import model as models
import sample
import sampler
import train
from conftest import cli, spawn, tiny_dit
from conftest import SMALL as FLAGS, ckpt_step, encode, rgb, spawn_signalled, write_tar

SMALL = [*FLAGS, "--batch-size", "8"]


def one_clear_line(r):
    """Failed, said why on stderr, no traceback."""
    return r.returncode != 0 and "error" in r.stderr and "Traceback" not in r.stderr


# ---- 1. data that yields nothing --------------------------------------------------------------------------

def test_shards_with_only_broken_images_stop_with_counts(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "00000.tar", [m for i in range(6) for m in
                                ((f"{i:04d}.jpg", b"not a jpeg"), (f"{i:04d}.txt", b"a caption"))])
    r = spawn("train.py", "--dataset", "cc3m", "--data-dir", str(d), "--out", str(tmp_path / "run"), timeout=60)
    assert one_clear_line(r), r.stderr[-2000:]
    assert "no usable sample" in r.stderr and "6 bad image" in r.stderr and "KEY.jpg + KEY.txt" in r.stderr


def test_folder_without_captions_stops_with_counts(tmp_path):
    for i in range(5):
        rgb(i).save(tmp_path / f"{i}.png")
    r = spawn("train.py", "--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
              timeout=60)
    assert one_clear_line(r), r.stderr[-2000:]
    assert "no usable sample" in r.stderr and "5 no caption" in r.stderr
    assert not os.path.exists(tmp_path / "run" / "tokenizer.json")  # no tokenizer from zero captions


def test_too_few_captions_for_a_tokenizer(tmp_path):
    for i in range(2):
        rgb(i).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a cat")
    with pytest.raises(SystemExit, match="2 usable caption"):
        data.tokenizer_for("folder", str(tmp_path), 64, 8, str(tmp_path / "run"), False, True)


def test_an_endless_stream_of_nothing_raises_instead_of_spinning(tmp_path):
    for i in range(3):
        rgb(i).save(tmp_path / f"{i}.png")                 # images, no captions
    code = f"import data; next(iter(data.ImageTextStream('folder', {str(tmp_path)!r}, 2, 8)))"
    r = spawn("-c", code, timeout=60)                      # in a child process: a hang fails by its time-out
    assert r.returncode != 0 and "RuntimeError" in r.stderr and "3 no caption" in r.stderr, r.stderr[-2000:]


def test_a_few_good_samples_among_many_bad_still_train(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    members = [m for i in range(20) for m in ((f"b{i:03d}.jpg", b"broken"), (f"b{i:03d}.txt", b"x"))]
    members += [m for i in range(5) for m in ((f"g{i:03d}.jpg", encode(rgb(i), "JPEG")),
                                             (f"g{i:03d}.txt", f"a photo of cat {i}".encode()))]
    write_tar(d / "00000.tar", members)
    out = tmp_path / "run"
    r = spawn("train.py", "--dataset", "cc3m", "--data-dir", str(d), "--image-size", "16", "--vocab-size", "64",
              *SMALL, "--batch-size", "4", "--max-steps", "2", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert rec["skipped"].get("bad_image", 0) >= 20        # the broken ones, counted in the log


# ---- 2. interrupted and diverging runs --------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[]] + [pytest.param(x, marks=pytest.mark.slow) for x in
                                          (["--fake-start", "0"], ["--flow-target", "0.25"], ["--shortcut", "0.25"])],
                         ids=["plain", "fake-term", "flow-target", "shortcut"])
def test_sigterm_saves_and_resume_is_exact(tmp_path, extra):
    """Bit for bit, with the paper's fake-score term (its riders, landings waiting for the next step, are the
    method's state and are saved too) and with each lever."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    steps = ["--max-steps", "12", "--ckpt-every", "1000", *extra]  # no periodic checkpoint: only SIGTERM's save
    r = cli("train", *SMALL, *steps, "--out", a)
    assert r.returncode == 0, r.stderr[-2000:]
    # the same run, sent SIGTERM right after step 5 (threads as the in-process run's: the same floats)
    p = spawn_signalled(signal.SIGTERM, 5, *SMALL, *steps, "--out", b, threads=torch.get_num_threads())
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]  # saved but unfinished: not 0
    assert ckpt_step(os.path.join(b, "ckpt.pt")) == 5                # stopped after the step it was in
    assert "stopped by SIGTERM" in p.stdout and "--resume" in p.stdout
    riders = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["method"][0]["rider"]
    assert (riders is not None) == ("--fake-start" in extra)
    r = cli("train", "--resume", "--out", b)
    assert "done: 12 steps" in r.stdout, r.stderr[-2000:]
    A = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    B = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    for key in ("model", "ema"):
        for name, tensor in A[key].items():
            assert torch.equal(tensor, B[key][name]), f"{key}.{name} differs after SIGTERM + resume"


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = data.shapes_batch

    def poisoned(seed, index, batch_size, image_size=32):  # batch 5 on carries NaN pixels
        x, captions = real(seed, index, batch_size, image_size)
        return (x * float("nan") if index >= 5 else x), captions

    monkeypatch.setattr(data, "shapes_batch", poisoned)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # train.main sets its own
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="non-finite loss or gradient at step 6.*(step 4)"):
        train.main([*SMALL, "--max-steps", "10", "--ckpt-every", "2", "--out", out])
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    ck = models.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_a_failing_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    models.save_checkpoint(path, model={"w": torch.ones(3)}, step=1)

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left.*previous checkpoint .* is intact"):
        models.save_checkpoint(path, model={"w": torch.zeros(3)}, step=2)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not os.path.exists(path + ".tmp")


# ---- 3. bad command-line input fails before any work ------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--batch-size", "0"], "--batch-size"),
    (["--image-size", "30"], "patch size 8"),
    (["--max-minutes", "-1"], "--max-minutes"),
    (["--lr", "0"], "--lr"),
    (["--max-steps", "0"], "--max-steps"),
    (["--model", "huge"], "--model"),
    (["--grad-accum", "0"], "--grad-accum"),
])
def test_train_rejects_bad_flags_at_once(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as e:                       # in-process: train.py's own argument check
        train.get_args([*flags, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "error" in err and says in err, err
    assert not os.path.exists(tmp_path / "run")                # nothing was started


def test_a_bad_flag_is_one_line_from_the_command_line(tmp_path):
    r = spawn("train.py", "--batch-size", "0", "--out", str(tmp_path / "run"), timeout=60)
    assert one_clear_line(r) and "--batch-size" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "run")


def test_sample_out_folder_or_bad_extension(tmp_path, tiny_ckpt):
    r = cli("sample", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "grid.pdq"), "--prompt", "a red circle")
    assert one_clear_line(r) and "extension" in r.stderr
    folder = tmp_path / "pics"
    r = cli("sample", "--ckpt", tiny_ckpt, "--out", str(folder), "--prompt", "a red circle", "--n", "2",
            "--steps", "1", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(os.listdir(folder))
    assert "grid.png" in names and len([n for n in names if n.endswith(".png")]) == 1 + 2 * 2


def test_evaluate_rejects_a_checkpoint_of_another_image_size(tmp_path, tiny_ckpt):
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["config"]["image_size"] = 64
    torch.save(ck, tmp_path / "big.pt")
    r = cli("evaluate", "--ckpt", str(tmp_path / "big.pt"), "--steps", "1", "--per-task", "1")
    assert one_clear_line(r) and "64 px" in r.stderr and "32 px" in r.stderr


# ---- mends: each found by trying the commands -------------------------------------------------------------

def test_sample_makes_a_missing_out_folder_first_or_refuses_before_sampling(tmp_path, tiny_ckpt):
    out = tmp_path / "missing" / "dir" / "x.png"
    r = cli("sample", "--ckpt", tiny_ckpt, "--out", str(out), "--prompt", "a red circle", "--n", "1")
    assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
    (tmp_path / "afile").write_text("in the way")
    r = cli("sample", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "afile" / "x.png"), "--prompt", "a red circle")
    assert one_clear_line(r) and "cannot make its folder" in r.stderr


def test_train_out_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    r = cli("train", *SMALL, "--max-steps", "2", "--out", str(tmp_path / "run"))
    assert one_clear_line(r) and "is a file" in r.stderr
    assert (tmp_path / "run").read_text() == "not a folder"


def test_resume_refuses_flags_that_contradict_the_run_and_takes_those_that_may_change(tmp_path, tiny_ckpt):
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.dirname(tiny_ckpt), run_dir)
    before = (run_dir / "ckpt.pt").read_bytes()
    for flags, says in ((["--method", "flow"], "--method flow (the run has selfe)"),
                        (["--patch", "4"], "--patch 4 (the run has 8)")):
        r = cli("train", "--resume", "--out", str(run_dir), *flags)
        assert one_clear_line(r) and says in r.stderr, r.stderr
    assert (run_dir / "ckpt.pt").read_bytes() == before                 # nothing was touched
    original = open(tiny_ckpt, "rb").read()
    r = cli("train", "--resume", "--out", str(run_dir), "--max-steps", "9", "--method", "selfe")
    assert r.returncode == 0 and "done: 9 steps" in r.stdout, r.stderr[-2000:]
    assert models.load_checkpoint(str(run_dir / "ckpt.pt"))["step"] == 9   # the copy resumed writes into itself,
    assert open(tiny_ckpt, "rb").read() == original                        # not into the folder it was copied from


def test_diagnose_works_on_exported_weights_and_says_so(tmp_path, tiny_ckpt):
    ck = models.load_checkpoint(tiny_ckpt)
    models.export_weights(ck, str(tmp_path / "ship.pt"))
    r = cli("scripts.diagnose", "--ckpt", str(tmp_path / "ship.pt"), "--out", str(tmp_path))
    assert r.returncode == 0 and "EMA weights only" in r.stdout, r.stderr[-2000:]
    rows = json.load(open(tmp_path / "diagnose.json"))["rows"]
    assert all(row["lag"] == 0 for row in rows.values()) and all(row["delta"] > 0 for row in rows.values())


# ---- 4. the front door's inputs: one line before any work, nothing silently wrong ---------------------------

@pytest.mark.parametrize("flags, says", [
    (["--max-text-len", "-1"], "--max-text-len"),
    (["--max-text-len", "0"], "--max-text-len"),     # was silently 16
    (["--clip", "-1"], "--clip"),                     # was gradient ascent
    (["--clip", "0"], "--clip"),                      # was a zero gradient
    (["--vocab-size", "0"], "--vocab-size"),
    (["--omega", "-1"], "--omega"),
    (["--meanflow-v-loss"], "--meanflow-v-loss"),     # a MeanFlow option on Self-E
    (["--dataset", "cc3m"], "--data-dir"),            # no data: no empty runs/cc3m/grids/ left behind
])
def test_train_refuses_what_would_train_wrongly(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as e:
        train.get_args([*flags, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and says in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "run")


def test_train_on_a_missing_data_dir_makes_no_run_folder(tmp_path):
    r = cli("train", "--dataset", "cc3m", "--data-dir", tmp_path / "nothing", "--out", tmp_path / "run")
    assert r.returncode != 0 and "error" in r.stderr and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("script, flags, says", [
    ("sample", ["--n", "5000"], "at most 512 images"),
    ("sample", ["--eta", "2"], "--eta must be in [0, 1]"),
    ("sample", ["--omega", "-1"], "--omega must be >= 0"),
    ("evaluate", ["--eta", "2", "--steps", "2"], "--eta must be in [0, 1]"),
    ("evaluate", ["--eta", "-1"], "--eta must be in [0, 1]"),
])
def test_sample_and_evaluate_refuse_bad_sampler_flags(tmp_path, tiny_ckpt, script, flags, says):
    r = cli(script, "--ckpt", tiny_ckpt, *flags, "--out", tmp_path / "out.png" if script == "sample" else tmp_path)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "out.png") and not os.path.exists(tmp_path / "shapes_eval.json")
    with pytest.raises(ValueError, match="eta"):  # and the sampler itself, for code that calls it
        sampler.sample(tiny_dit(), torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long), 2, 0.0,
                       (3, 8, 8), eta=2.0)


def test_a_bad_sampler_flag_is_one_line_from_the_command_line(tmp_path):
    r = spawn("evaluate.py", "--ckpt", "x.pt", "--eta", "2", "--steps", "2", timeout=60)
    assert one_clear_line(r) and len(r.stderr.strip().splitlines()) == 1 and "usage" not in r.stderr, r.stderr


def test_sample_names_the_words_it_never_saw_and_a_cut_prompt(tmp_path, tiny_ckpt):
    long = "a red circle left of a blue square and a green triangle above a pink circle and two squares"
    r = cli("sample", "--ckpt", tiny_ckpt, "--prompt", "a cat on a sofa", "--prompt", long, "--n", "1",
            "--out", tmp_path / "g.png")
    assert r.returncode == 0 and os.path.exists(tmp_path / "g.png"), r.stderr   # it samples all the same
    assert "cat, on, sofa" in r.stdout and "the model reads the first 16" in r.stdout, r.stdout
    r = cli("sample", "--ckpt", tiny_ckpt, "--prompt", "a red circle", "--n", "1", "--out", tmp_path / "h.png")
    assert "note" not in r.stdout


def test_a_file_that_is_no_checkpoint_is_one_line_without_unsafe_advice(tmp_path):
    r = cli("sample", "--ckpt", os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"),
            "--out", tmp_path / "g.png")
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr and "weights_only" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_measurements_of_the_shipped_weights_never_go_into_checkpoints(tmp_path):
    assert sample.output_folder(sample.SHIPPED_CKPT) == os.path.join("eval", "shipped")
    assert sample.output_folder(str(tmp_path / "ckpt.pt")) == str(tmp_path)      # a run: its own folder
    assert sample.output_folder(sample.SHIPPED_CKPT, "mine") == "mine"


def test_long_sampling_shows_a_progress_bar(tmp_path, tiny_ckpt, monkeypatch):
    seen = []
    real = sampler.tqdm
    monkeypatch.setattr(sampler, "tqdm", lambda it, **kw: seen.append(kw) or real(it, **kw))
    assert cli("sample", "--ckpt", tiny_ckpt, "--steps", "3", "--n", "1", "--prompt", "a red circle",
               "--out", tmp_path / "g.png").returncode == 0
    assert seen and not seen[0]["disable"] and seen[0]["delay"] == 2     # shown once a sampling passes 2 s
