"""CC3M webdataset shards and folders: broken files skipped and counted, shards split without overlap."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import cli, encode, rgb, write_tar


def write_shards(folder, n_shards, per_shard, caption):
    """n_shards clean shards of per_shard JPEG samples with keys SSSSSIIII; caption(key, i) -> str. Returns the keys."""
    keys = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            k = f"{s:05d}{i:04d}"
            members += [(f"{k}.jpg", encode(rgb(i), "JPEG")), (f"{k}.txt", caption(k, i).encode())]
            keys.append(k)
        write_tar(folder / f"{s:05d}.tar", members)
    return keys


@pytest.fixture
def messy_shard(tmp_path):
    """One shard with every kind of sample img2dataset (and the web) produces. Returns (dir, good captions)."""
    good_jpg = encode(rgb(0), "JPEG")
    members = [
        ("000000000.jpg", good_jpg), ("000000000.txt", b"a photo of a dog"), ("000000000.json", b"{}"),
        ("000000001.jpg", encode(rgb(1), "JPEG")[:300]), ("000000001.txt", b"truncated jpeg"),
        ("000000002.jpg", encode(rgb(2).convert("CMYK"), "JPEG")), ("000000002.txt", b"a cmyk image"),
        ("000000003.png", encode(rgb(3).convert("L"), "PNG")), ("000000003.txt", b"a grayscale image"),
        ("000000004.png", encode(rgb(4).convert("RGBA"), "PNG")), ("000000004.txt", b"a png with alpha"),
        ("000000005.jpg", good_jpg),                                           # no caption
        ("000000009.JPG", encode(rgb(9), "JPEG")), ("000000009.TXT", b"after a gap in keys"),
        ("000000010.png", encode(rgb(10).convert("P"), "PNG")), ("000000010.txt", b"a palette image"),
        ("000000011.jpg", b"not an image at all"), ("000000011.txt", b"garbage bytes"),
        ("000000012.jpg", good_jpg), ("000000012.txt", b"   "),                  # empty caption
    ]
    write_tar(tmp_path / "00000.tar", members)
    good = ["a photo of a dog", "a cmyk image", "a grayscale image", "a png with alpha", "after a gap in keys",
            "a palette image"]
    return tmp_path, good


def read_all(stream):
    caps, bad, shapes = [], {}, set()
    for x, c, b in stream:
        caps += c
        shapes.add(tuple(x.shape[1:]))
        for k, v in b.items():
            bad[k] = bad.get(k, 0) + v
        assert len(x) == 0 or (x.min() >= -1 and x.max() <= 1)
    return caps, bad, shapes


def test_loader_yields_exactly_the_good_samples(messy_shard):
    folder, good = messy_shard
    stream = data.ImageTextStream("cc3m", str(folder), batch_size=2, image_size=16, hflip=False, epochs=1)
    caps, bad, shapes = read_all(stream)
    assert sorted(caps) == sorted(good)
    assert bad == {"bad_image": 2, "no_caption": 2}  # truncated + garbage; missing + empty caption
    assert shapes == {(3, 16, 16)}


def test_image_conversion_resize_and_crop():
    img = Image.new("RGBA", (60, 20), (255, 0, 0, 0))  # fully transparent: white after compositing
    out = data.load_image(io.BytesIO(encode(img, "PNG")), 16)
    assert out.shape == (16, 16, 3) and (out == 255).all()
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # a white band in the middle third: the centre crop keeps only the band
    out = data.load_image(io.BytesIO(encode(Image.fromarray(wide), "PNG")), 10)
    assert out.shape == (10, 10, 3) and out.mean() > 200


def test_flip_swaps_left_and_right():
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    out, cap = data.flip(img, "a cat left of a dog, right here; leftover")
    assert cap == "a cat right of a dog, left here; leftover"
    assert (out[:, 0] == img[:, 1]).all()


@pytest.mark.parametrize("n_shards", [5, 1])
def test_shards_split_across_ranks_and_workers_without_overlap(tmp_path, n_shards):
    keys = write_shards(tmp_path, n_shards, 7, lambda k, i: k)
    seen = []
    world, workers = 2, 2
    for rank in range(world):
        stream = data.ImageTextStream("cc3m", str(tmp_path), 1, 8, rank=rank, world=world, epochs=1)
        for wid in range(workers):  # consumer rank * workers + wid of world * workers
            seen += [c for _, _, c in stream.raw_samples(0, rank * workers + wid, world * workers)]
    assert sorted(seen) == sorted(keys)  # every sample exactly once per epoch
    # and through a real DataLoader with 2 worker processes, for one rank of 2
    stream = data.ImageTextStream("cc3m", str(tmp_path), 1, 8, rank=1, world=2, hflip=False, epochs=1)
    got = [c[0] for _, c, _ in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)]
    expected = [c for wid in range(2) for _, _, c in stream.raw_samples(0, 2 + wid, 4)]
    assert sorted(got) == sorted(expected) and len(set(got)) == len(got)


def test_folder_dataset_txt_and_tsv(tmp_path):
    (tmp_path / "a").mkdir()
    rgb(0).save(tmp_path / "a" / "one.jpg")
    (tmp_path / "a" / "one.txt").write_text("first caption")
    rgb(1).save(tmp_path / "two.png")
    (tmp_path / "two.txt").write_text("second caption")
    rgb(2).save(tmp_path / "three.png")  # no caption file: skipped and counted
    caps, bad, _ = read_all(data.ImageTextStream("folder", str(tmp_path), 1, 8, epochs=1))
    assert sorted(caps) == ["first caption", "second caption"] and bad == {"no_caption": 1}
    (tmp_path / "captions.tsv").write_text("a/one.jpg\tfrom the tsv\nmissing.jpg\tgone\n")
    caps, bad, _ = read_all(data.ImageTextStream("folder", str(tmp_path), 1, 8, epochs=1))
    assert caps == ["from the tsv"] and bad == {"bad_image": 1}


def test_missing_or_empty_data_dir_explains_the_layout(tmp_path):
    for d in (str(tmp_path / "nope"), str(tmp_path)):
        r = cli("train", "--dataset", "cc3m", "--data-dir", d, "--out", tmp_path / "run")
        assert r.returncode != 0
        assert "img2dataset" in r.stderr and "--output_format webdataset" in r.stderr


def test_train_on_shards_trains_saves_and_reuses_the_tokenizer(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shards(shards, 2, 12, lambda k, i: f"a photo number {i} of a cat")
    out = tmp_path / "run"
    args = ["--dataset", "cc3m", "--data-dir", str(shards), "--image-size", "16",
            "--batch-size", "4", "--max-minutes", "0", "--sample-every", "0", "--vocab-size", "64", "--out", str(out)]
    r = cli("train", *args, "--max-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = (out / "tokenizer.json").read_text()
    assert "cat" in saved and "fake" in saved  # trained on the shards' captions (and the fake prompt)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["tokenizer"] == saved and ck["config"]["image_size"] == 16
    r = cli("train", *args, "--resume", "--max-steps", "3")
    assert r.returncode == 0 and "done: 3 steps" in r.stdout, r.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["tokenizer"] == saved
