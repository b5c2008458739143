"""ShapesEval is calibrated: truth scores ~1, noise ~0, and each kind of mistake fails its task."""
import copy
import json
import random

import numpy as np
import pytest
import torch

import data
import evaluate
from conftest import cli

PER_TASK, N = 50, 4  # the full prompt set of every reported score
PINNED = ['a triangle', 'a circle and a triangle', 'two squares']  # the first prompt of the first three tasks


@pytest.fixture(scope="module")
def prompts():
    return evaluate.eval_prompts(PER_TASK)


def test_prompt_set_is_fixed_and_covers_every_task_and_shape(prompts):
    assert [c for c, _ in prompts[:: PER_TASK][:3]] == PINNED        # the set itself is pinned: scores stay comparable
    assert evaluate.eval_prompts(PER_TASK, seed=1) != prompts          # and it is the seed that fixes it
    tasks = [s["task"] for _, s in prompts]
    assert all(tasks.count(t) == PER_TASK for t in data.TASKS)
    singles = {s["include"][0]["shape"] for _, s in prompts if s["task"] == "single_object"}
    assert singles == set(data.SHAPES)


def test_ground_truth_scores_near_one(prompts):
    ref = evaluate.reference_images(prompts, N, seed=evaluate.REFERENCE_SEED + 5)
    s = evaluate.score(ref, prompts, N)
    assert s["overall"] >= 0.97, s
    assert all(s[t] >= 0.95 for t in data.TASKS), s


def test_noise_and_blank_score_near_zero(prompts):
    rows = evaluate.floor_rows(PER_TASK, N, noise=True)
    assert rows["noise"]["overall"] <= 0.05 and rows["blank"]["overall"] <= 0.05, rows


def test_overall_is_the_unweighted_mean_of_tasks(prompts):
    ref = evaluate.reference_images(prompts, 1)
    keep = [i for i, (_, s) in enumerate(prompts) if s["task"] != "counting" or i % 2]  # unequal task sizes
    s = evaluate.score(ref[keep], [prompts[i] for i in keep], 1)
    assert s["overall"] == pytest.approx(np.mean([s[t] for t in data.TASKS]))


def render_wrong(prompts, task, mutate, seed=0):
    """Render each prompt of `task` with its spec mutated: the image is wrong for the prompt."""
    rng = random.Random(seed)
    chosen = [(c, s) for c, s in prompts if s["task"] == task]
    images = []
    for _, spec in chosen:
        bad = mutate(copy.deepcopy(spec), rng)
        images.append(data.render(data.scene_from_spec(bad, rng)))
    return np.stack(images), chosen


def test_wrong_colour_fails(prompts):
    def recolour(spec, rng):
        for r in spec["include"]:
            r["color"] = rng.choice([c for c in data.COLORS if c != r["color"]])
        return spec
    for task in ("colors", "color_attr"):
        images, chosen = render_wrong(prompts, task, recolour)
        assert evaluate.score(images, chosen, 1)[task] <= 0.05


def test_wrong_count_fails(prompts):
    def miscount(spec, rng):
        r = spec["include"][0]
        r["count"] = r["count"] + 1 if r["count"] < 4 else r["count"] - 1
        return spec
    images, chosen = render_wrong(prompts, "counting", miscount)
    assert evaluate.score(images, chosen, 1)["counting"] <= 0.05


def test_wrong_position_fails(prompts):
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

    def flip(spec, rng):
        rel, a, b = spec["position"]
        spec["position"] = (opposite[rel], a, b)
        return spec
    images, chosen = render_wrong(prompts, "position", flip)
    assert evaluate.score(images, chosen, 1)["position"] <= 0.05


def test_missing_object_fails(prompts):
    def drop(spec, rng):
        spec["include"] = spec["include"][:1]
        spec["position"] = None
        return spec
    images, chosen = render_wrong(prompts, "two_object", drop)
    assert evaluate.score(images, chosen, 1)["two_object"] <= 0.05


def test_detector_finds_shape_colour_and_box():
    objects = [dict(shape="triangle", color="blue", box=(2, 3, 13, 14)),
               dict(shape="circle", color="orange", box=(18, 18, 29, 29))]
    dets = evaluate.detect(data.render(objects)[None])[0]
    assert sorted((d["shape"], d["color"]) for d in dets) == [("circle", "orange"), ("triangle", "blue")]
    tri = next(d for d in dets if d["shape"] == "triangle")
    assert all(abs(a - b) <= 1.5 for a, b in zip(tri["box"], (2, 3, 13, 14)))


def test_patch_distance_sees_blur_and_noise(prompts):
    ref = evaluate.reference_images(prompts[::6], N)
    ref2 = evaluate.reference_images(prompts[::6], N, seed=1)
    x = data.to_tensor(ref2)
    blurred = data.to_uint8(torch.nn.functional.avg_pool2d(x, 3, 1, 1))
    noisy = data.to_uint8(x + 0.3 * torch.randn_like(x))
    floor, blur, noise = (evaluate.patch_swd(a, ref) for a in (ref2, blurred, noisy))
    assert floor < 0.5 * blur and floor < 0.5 * noise, (floor, blur, noise)


def test_spread_sees_a_collapse(prompts):
    """Single-object renders vary in place and size; one image repeated does not; a shrunken copy set varies less."""
    single = [p for p in prompts if p[1]["task"] == "single_object"][:20]
    ref = evaluate.reference_images(single, N)
    assert evaluate.spread(ref) > 2                                       # pixels, on 32 px images
    assert evaluate.spread(np.repeat(ref[:1], len(ref), 0)) == 0
    assert evaluate.spread(ref[::2]) == pytest.approx(evaluate.spread(ref), rel=0.5)


def test_evaluate_takes_a_generator_callable():
    """A generator that draws the truth for each prompt scores ~1; one that draws noise scores ~0."""
    lookup = {c: s for c, s in evaluate.eval_prompts(10)}
    rng = random.Random(0)

    def perfect(captions, steps):
        return np.stack([data.render(data.scene_from_spec(lookup[c], rng)) for c in captions])

    def noise(captions, steps):
        return torch.randn(len(captions), 3, 32, 32)
    good = evaluate.evaluate(perfect, [1, 4], per_task=10, n_per_prompt=2)
    bad = evaluate.evaluate(noise, [1], per_task=10, n_per_prompt=2)
    assert set(good) == {"1", "4"} and good["1"]["overall"] >= 0.95
    assert bad["1"]["overall"] <= 0.05 and bad["1"]["swd"] > 3 * good["1"]["swd"]


def test_cli_writes_table_and_json(tmp_path):
    r = cli("evaluate", "--reference", "--noise", "--per-task", "10", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "| reference |" in out and "| noise |" in out and "overall" in out
    rows = json.load(open(tmp_path / "shapes_eval.json"))["rows"]
    assert rows["reference"]["overall"] > 0.9 and rows["noise"]["overall"] < 0.1
    assert set(data.TASKS) <= set(rows["blank"])
