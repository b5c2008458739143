"""The shapes world, its captions and the tokenizer."""
import random
import re

import numpy as np
import pytest
import torch

import data
import evaluate


def truth(objects):
    """The scene's objects as perfect detections."""
    return [dict(shape=o["shape"], color=o["color"], box=o["box"], conf=1.0) for o in objects]


@pytest.mark.parametrize("kind", data.TASKS)
def test_captions_are_true_to_their_scene(kind):
    rng = random.Random(7)
    for _ in range(200):
        objects, caption, spec = data.make_example(kind, rng)
        assert 1 <= len(objects) <= 4
        assert evaluate.judge(truth(objects), spec), (caption, objects)
        for o in objects:  # every word of the caption that names a shape or colour is in the scene
            assert o["shape"] in data.SHAPES and o["color"] in data.COLORS
        named = set(re.findall("|".join(data.SHAPES), caption))
        assert named <= {o["shape"] for o in objects}
        named_colors = {w for w in caption.split() if w in data.COLORS}
        assert named_colors <= {o["color"] for o in objects}


def test_full_descriptions_count_every_object():
    rng = random.Random(3)
    words = {v: k for k, v in data.NUMBERS.items()}
    words["an"] = 1
    for _ in range(200):
        objects, caption, _ = data.make_example("full", rng)
        total = sum(words[m] for m in re.findall(r"\b(a|an|two|three|four)\b", caption))
        assert total == len(objects), caption
        for o in objects:
            assert f"{o['color']} {o['shape']}" in caption


def test_objects_do_not_overlap_and_stay_inside():
    rng = random.Random(0)
    for size in (32, 64):
        for _ in range(300):
            objects, _, _ = data.make_example(rng.choice(data.KINDS), rng, size)
            boxes = [o["box"] for o in objects]
            for b in boxes:
                assert 0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size
            for i in range(len(boxes)):
                for j in range(i):
                    a, b = boxes[i], boxes[j]
                    assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_relations_follow_box_centres():
    left, right = (0, 10, 8, 18), (20, 11, 28, 19)
    assert data.relations(left, right) == {"left of"}
    assert data.relations(right, left) == {"right of"}
    top, bottom = (10, 0, 18, 8), (11, 20, 19, 28)
    assert data.relations(top, bottom) == {"above"}
    assert data.relations(bottom, top) == {"below"}
    assert data.relations(left, (1, 10, 9, 18)) == set()  # within the margin: no relation


def test_batches_are_deterministic_and_in_range():
    x, c = data.shapes_batch(seed=1, index=5, batch_size=8)
    x2, c2 = data.shapes_batch(seed=1, index=5, batch_size=8)
    x3, _ = data.shapes_batch(seed=1, index=6, batch_size=8)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, x2) and c == c2 and not torch.equal(x, x3)
    assert x.min() >= -1 and x.max() <= 1
    # anti-aliased: some pixels lie strictly between the background and the object colours
    assert len(torch.unique(x[0, 0])) > 3
    big, _ = data.shapes_batch(seed=1, index=5, batch_size=2, image_size=64)
    assert big.shape == (2, 3, 64, 64)


def test_stream_order_does_not_depend_on_workers():
    def first(workers, n=4):
        ds = data.ShapesStream(seed=3, batch_size=2, start=10)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        return [next(it) for _ in range(n)]
    a, b = first(0), first(2)
    for (xa, ca, _), (xb, cb, _) in zip(a, b):
        assert torch.equal(xa, xb) and ca == cb
    assert torch.equal(a[0][0], data.shapes_batch(3, 10, 2)[0])


def test_background_is_distinct_from_every_colour():
    bg = np.array(data.BACKGROUND)
    cols = np.array(list(data.COLORS.values()))
    assert np.linalg.norm(cols - bg, axis=1).min() > 2 * evaluate.FG_THRESHOLD
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + 1e3 * np.eye(len(cols))
    assert d.min() > 60


@pytest.fixture(scope="module")
def tok():
    return data.Tokenizer(data.train_tokenizer(data.shapes_captions(2000)).json, max_len=12)


def test_tokenizer_pads_truncates_and_has_a_null_prompt(tok):
    ids = tok(["a red circle left of a blue square", "", "Two RED circles"])
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert (ids[1] == 0).all()                        # the empty prompt is all padding
    assert (ids[0] != 0).sum() == 8 and (ids[0, 8:] == 0).all()
    assert tok.decode(ids[2].tolist()) == "two red circles"  # lower-cased
    long = tok([" ".join(["circle"] * 40)])
    assert long.shape == (1, 12) and (long != 0).all()
    assert (tok(["a zebra"]) != 0).sum() >= 2         # unknown words do not crash
    assert tok(["fake image a circle"])[0, 0] != tok.tok.token_to_id("[UNK]")


def test_tokenizer_round_trips_through_json(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    tok2 = data.Tokenizer.load(tmp_path / "tok.json", max_len=12)
    caps = ["three triangles", "an orange square and a pink circle", ""]
    assert torch.equal(tok(caps), tok2(caps))
