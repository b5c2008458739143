"""Data: the built-in `shapes` world, the tokenizer, and (for real runs) CC3M shards.

shapes: an endless, seeded stream of (image, caption) pairs drawn with Pillow. Each scene holds 1-4
non-overlapping objects (a shape, a colour, a place) on a grey background; each caption is an English
sentence generated from the scene and true to it, of one of GenEval's six kinds (single object, two
objects, counting, colours, position, colour attribution) or a fuller description. The same code that
draws training scenes draws the evaluation references (evaluate.py), with a seed training never uses.

    python data.py                      # writes shapes_preview.png with 16 samples and their captions

Images are float tensors in [-1, 1], shape (3, H, W). Batch b of the stream is a pure function of
(seed, b), so a resumed run sees exactly the batches it would have seen.
"""
import io
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# the shapes world

SHAPES = ("circle", "square", "triangle")
COLORS = {  # GenEval's colour names; every one stays distinct from the others and from the background
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 40),
    "green": (30, 160, 60),
    "blue": (35, 75, 230),
    "purple": (130, 40, 170),
    "pink": (255, 140, 210),
    "brown": (120, 70, 20),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
BACKGROUND = (128, 128, 128)
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
KINDS = TASKS + ("full",)  # training captions: GenEval's six kinds plus a full description
SUPERSAMPLE = 4            # draw at 4x, then downsample: anti-aliased edges
POSITION_MARGIN = 0.1      # GenEval-style margin, as a fraction of the two objects' summed sizes


def relations(box_a, box_b):
    """The set of relations that hold for object a relative to b ("left of", ...), from box centres.

    Boxes are (x0, y0, x1, y1). As in GenEval, the centre offset is shrunk by a margin proportional to
    the objects' sizes, and a relation holds when its axis carries more than half the (unit) offset."""
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    offset = ca - cb
    norm = np.linalg.norm(offset)
    shrunk = np.maximum(np.abs(offset) - POSITION_MARGIN * dims, 0) * np.sign(offset)
    if norm < 1e-6 or np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / norm
    out = set()
    if dx < -0.5: out.add("left of")
    if dx > 0.5: out.add("right of")
    if dy < -0.5: out.add("above")   # image y grows downwards
    if dy > 0.5: out.add("below")
    return out


def _place(rng, sizes, image_size, gap):
    """Random non-overlapping boxes (x0, y0, x1, y1) for objects of the given sizes, or None."""
    boxes = []
    for size in sizes:
        for _ in range(100):
            x0, y0 = rng.uniform(1, image_size - 1 - size), rng.uniform(1, image_size - 1 - size)
            box = (x0, y0, x0 + size, y0 + size)
            if all(box[0] > b[2] + gap or box[2] < b[0] - gap or box[1] > b[3] + gap or box[3] < b[1] - gap
                   for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _a(word):
    """'a' or 'an' before this word."""
    return "an" if word[0] in "aeiou" else "a"


def _plural(words, n):
    """'a red circle', 'an orange square', 'three triangles'."""
    return (_a(words) if n == 1 else NUMBERS[n]) + f" {words}" + ("s" if n > 1 else "")


def _describe(objects):
    """A full description: every object, grouped by (colour, shape), e.g. 'two red circles and a blue square'."""
    groups = {}
    for o in objects:
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    parts = [_plural(f"{c} {s}", n) for (c, s), n in groups.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_example(kind, rng, image_size=32):
    """One scene of the given kind: (objects, caption, spec).

    objects: list of dicts with shape, color, box (pixel coordinates at image_size).
    spec: what the caption asks for, in GenEval's terms, used by the scorer:
      {"task", "include": [{"shape", "count", "color"}], "exact": bool, "position": (rel, i, j) or None}"""
    shapes, colors = list(SHAPES), list(COLORS)
    position, exact = None, False
    if kind == "single_object":
        shape = rng.choice(shapes)
        caption, include = f"a {shape}", [dict(shape=shape, count=1, color=None)]
    elif kind == "two_object" or kind == "position":
        a, b = rng.sample(shapes, 2)
        include = [dict(shape=a, count=1, color=None), dict(shape=b, count=1, color=None)]
        if kind == "two_object":
            caption = f"a {a} and a {b}"
        else:
            position = (rng.choice(RELATIONS), 0, 1)
            caption = f"a {a} {position[0]} a {b}"
    elif kind == "counting":
        shape, n = rng.choice(shapes), rng.choice([2, 3, 4])
        caption, include, exact = _plural(shape, n), [dict(shape=shape, count=n, color=None)], True
    elif kind == "colors":
        shape, color = rng.choice(shapes), rng.choice(colors)
        caption, include = _plural(f"{color} {shape}", 1), [dict(shape=shape, count=1, color=color)]
    elif kind == "color_attr":
        (a, b), (ca, cb) = rng.sample(shapes, 2), rng.sample(colors, 2)
        caption = f"{_plural(f'{ca} {a}', 1)} and {_plural(f'{cb} {b}', 1)}"
        include = [dict(shape=a, count=1, color=ca), dict(shape=b, count=1, color=cb)]
    elif kind == "full":
        objs = [(rng.choice(shapes), rng.choice(colors)) for _ in range(rng.randint(1, 4))]
        objects = layout(objs, None, rng, image_size)
        return objects, _describe(objects), dict(task=kind, include=[], exact=False, position=None)
    else:
        raise ValueError(f"unknown caption kind {kind!r}; choose from {KINDS}")
    spec = dict(task=kind, include=include, exact=exact, position=position)
    return scene_from_spec(spec, rng, image_size), caption, spec


def scene_from_spec(spec, rng, image_size=32):
    """A random scene that satisfies spec: exactly the objects it names; colours it leaves free are random."""
    objs = [(r["shape"], r["color"] or rng.choice(list(COLORS))) for r in spec["include"] for _ in range(r["count"])]
    return layout(objs, spec["position"], rng, image_size)


def layout(objs, position, rng, image_size):
    """Give each (shape, colour) a size and a place, with no overlaps and the relation (if any) true."""
    for _ in range(1000):
        sizes = [rng.uniform(0.25, 0.375) * image_size for _ in objs]
        boxes = _place(rng, sizes, image_size, gap=0.08 * image_size)
        if boxes is None:
            continue
        if position is not None and position[0] not in relations(boxes[position[1]], boxes[position[2]]):
            continue
        return [dict(shape=s, color=c, box=box) for (s, c), box in zip(objs, boxes)]
    raise RuntimeError(f"could not lay out {objs} with {position}")


def render(objects, image_size=32):
    """Draw objects on the background (supersampled, then downsampled): a uint8 array (H, W, 3)."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (image_size * k, image_size * k), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x0, y0, x1, y1 = (v * k for v in o["box"])
        color = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:  # upright triangle: apex at the top centre
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    return np.asarray(img.resize((image_size, image_size), Image.BOX))


def to_tensor(images):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def to_uint8(x):
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def shapes_batch(seed, index, batch_size, image_size=32):
    """Batch `index` of the shapes stream with this seed: (images (B, 3, H, W) in [-1, 1], captions)."""
    rng = random.Random(seed * 1_000_003 + index)
    images, captions = [], []
    for _ in range(batch_size):
        objects, caption, _ = make_example(rng.choice(KINDS), rng, image_size)
        images.append(render(objects, image_size))
        captions.append(caption)
    return to_tensor(np.stack(images)), captions


class ShapesStream(torch.utils.data.IterableDataset):
    """Endless stream of shapes batches (images, captions, {}), starting at batch `start` (for resume).

    With several dataloader workers, worker w makes batches start + w, start + w + W, ...; the DataLoader
    interleaves them in order, so the sequence of batches does not depend on the number of workers."""

    def __init__(self, seed, batch_size, image_size=32, start=0):
        self.seed, self.batch_size, self.image_size, self.start = seed, batch_size, image_size, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + wid
        while True:
            yield (*shapes_batch(self.seed, index, self.batch_size, self.image_size), {})  # {}: nothing skipped
            index += nw


# -----------------------------------------------------------------------------
# the tokenizer: one object for shapes and CC3M captions

PAD, UNK = "[PAD]", "[UNK]"  # id 0 is padding; an empty caption is all padding: the null prompt


def train_tokenizer(captions, vocab_size=1024):
    """Train a small lower-cased BPE tokenizer (the `tokenizers` package) on these captions."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
    tok.train_from_iterator(captions, trainer)
    return Tokenizer(tok.to_str())


FAKE_PROMPT = "fake image"  # Self-E's fake-score prompt c_fake = FAKE_PROMPT + " " + caption (appendix S.1.2)


def shapes_captions(n=5000, seed=12345):
    """Captions of the shapes world for training its tokenizer (plus the fake-score prompt's words)."""
    rng = random.Random(seed)
    return [make_example(rng.choice(KINDS), rng)[1] for _ in range(n)] + [FAKE_PROMPT] * 10


class Tokenizer:
    """Wraps a `tokenizers` JSON: captions -> fixed-length id tensors, padded/truncated to max_len."""

    def __init__(self, json_str, max_len=24):
        from tokenizers import Tokenizer as HFTokenizer
        self.json, self.max_len = json_str, max_len
        self.tok = HFTokenizer.from_str(json_str)
        self.tok.enable_padding(pad_id=0, pad_token=PAD, length=max_len)
        self.tok.enable_truncation(max_length=max_len)
        assert self.tok.token_to_id(PAD) == 0, "the padding token must have id 0"
        self.vocab_size = self.tok.get_vocab_size()

    def __call__(self, captions):
        """list of str -> LongTensor (B, max_len); "" gives all zeros (the null prompt)."""
        return torch.tensor([e.ids for e in self.tok.encode_batch(list(captions))], dtype=torch.long)

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i != 0])

    def notices(self, prompt):
        """What the model will not read of a prompt, one line each (sample.py prints them before sampling): words
        the tokenizer spells in pieces (it never saw them whole in training, e.g. "cat" for shapes) and tokens
        past max_len (cut)."""
        enc, out = self.tok.encode(prompt), []
        pieces = [w for w, _ in self.tok.pre_tokenizer.pre_tokenize_str(prompt.lower())
                  if w.isalpha() and self.tok.token_to_id(w) is None]
        if pieces:
            out.append(f"note: {prompt!r}: words never seen whole in training (spelled in pieces): "
                       f"{', '.join(dict.fromkeys(pieces))}")
        if enc.overflowing:
            n = self.max_len + sum(len([i for i in o.ids if i != 0]) for o in enc.overflowing)
            out.append(f"note: {prompt!r} has {n} tokens; the model reads the first {self.max_len} (--max-text-len)")
        return out

    def save(self, path):
        with open(path, "w") as f:
            f.write(self.json)

    @staticmethod
    def load(path, max_len=24):
        with open(path) as f:
            return Tokenizer(f.read(), max_len)


# -----------------------------------------------------------------------------
# real data: CC3M as img2dataset writes it (webdataset tar shards), or a plain folder

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp"}
CC3M_HELP = r"""expected layout: DIR/*.tar, webdataset shards as img2dataset writes them, each sample
KEY.jpg + KEY.txt (+ KEY.json). To make them from the CC3M TSV (Google's Train_GCC-training.tsv):
    pip install img2dataset
    sed -i '1s/^/caption\turl\n/' Train_GCC-training.tsv
    img2dataset --url_list Train_GCC-training.tsv --input_format tsv --url_col url --caption_col caption \
        --output_format webdataset --output_folder DIR --processes_count 16 --thread_count 64 \
        --image_size 256 --resize_mode keep_ratio
For --dataset folder: DIR holds images with same-named .txt captions (a.jpg + a.txt), or a captions.tsv
of 'path<TAB>caption' lines (paths relative to DIR)."""


def list_sources(dataset, data_dir):
    """The shard files (cc3m) or (image path, caption, caption file) triples (folder; the caption is read
    lazily from the file when there is no TSV); a clear error if there are none."""
    if not data_dir or not os.path.isdir(data_dir):
        raise SystemExit(f"error: --data-dir {data_dir!r} is not a folder.\n{CC3M_HELP}")
    if dataset == "cc3m":
        shards = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".tar"))
        if not shards:
            raise SystemExit(f"error: no .tar shards in {data_dir}.\n{CC3M_HELP}")
        return shards
    tsv = os.path.join(data_dir, "captions.tsv")
    if os.path.exists(tsv):
        with open(tsv, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t", 1) for line in f if "\t" in line]
        pairs = [(os.path.join(data_dir, p), c, None) for p, c in rows]      # (image, caption, caption file)
    else:
        pairs = []
        for root, _, files in sorted(os.walk(data_dir)):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext[1:].lower() in IMAGE_EXTS:
                    pairs.append((os.path.join(root, name), None, os.path.join(root, stem + ".txt")))
    if not pairs:
        raise SystemExit(f"error: no images found in {data_dir}.\n{CC3M_HELP}")
    return pairs


def read_shard(path):
    """Samples of one webdataset tar, streamed: dicts {ext: bytes} with "__key__", members grouped by key
    (the name up to the first dot of the basename; extensions lower-cased). Gaps in keys are fine."""
    import tarfile
    sample, key = {}, None
    with tarfile.open(path, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            dirname, base = os.path.split(m.name)
            k, _, ext = base.partition(".")
            k = os.path.join(dirname, k)
            if k != key and sample:
                yield sample
                sample = {}
            key = k
            sample["__key__"] = k
            sample[ext.lower()] = tar.extractfile(m).read()
    if sample:
        yield sample


def load_image(f, size):
    """An image file (path or file object) -> uint8 (size, size, 3): RGB (alpha composited on white,
    grayscale/CMYK/palette converted), short side resized to size, centre-cropped. Raises if it is broken."""
    img = Image.open(f)
    img.load()  # decode now: a truncated or corrupt file raises here
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def flip(image, caption):
    """Horizontal flip, with 'left' and 'right' swapped in the caption so that it stays true."""
    import re
    swapped = re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", caption)
    return image[:, ::-1], swapped


class ImageTextStream(torch.utils.data.IterableDataset):
    """Endless batches (images (B, 3, H, W) in [-1, 1], captions, skipped counts) from CC3M shards or a folder.

    Every epoch, all (rank, worker) consumers share one shuffled order of the sources and take disjoint
    slices of it: shard k goes to consumer k mod C when there are at least C shards, else sample i of the
    epoch goes to consumer i mod C. So no sample is seen twice per epoch and none is skipped. Broken
    samples (undecodable image, missing or empty caption) are skipped and counted; counts ride with the
    next batch."""

    def __init__(self, dataset, data_dir, batch_size, image_size, rank=0, world=1, seed=0, hflip=True,
                 epochs=None):
        self.dataset, self.sources = dataset, list_sources(dataset, data_dir)
        self.batch_size, self.image_size, self.hflip = batch_size, image_size, hflip
        self.rank, self.world, self.seed, self.epochs = rank, world, seed, epochs

    def raw_samples(self, epoch, cid=0, n=1):
        """(key, image file, caption or None) for consumer cid of n's share of one epoch."""
        order = list(self.sources)
        random.Random(self.seed + epoch).shuffle(order)  # the same order on every consumer
        by_shard = len(order) >= n
        i = -1
        for k, src in enumerate(order):
            if by_shard and k % n != cid:
                continue
            if self.dataset == "cc3m":
                try:
                    for sample in read_shard(src):
                        i += 1
                        if by_shard or i % n == cid:
                            img = next((sample[e] for e in sample if e in IMAGE_EXTS), None)
                            cap = sample.get("txt")
                            yield sample["__key__"], img, cap.decode("utf-8", "replace") if cap else None
                except Exception as e:  # a truncated or unreadable tar: keep what it gave, go on
                    yield f"{src}: {e}", None, None
            else:
                i += 1
                if by_shard or i % n == cid:
                    path, cap, txt = src
                    if txt is not None:  # a folder of images with same-named .txt captions
                        cap = open(txt, encoding="utf-8").read() if os.path.exists(txt) else None
                    yield path, path, cap

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        cid, n = self.rank * nw + wid, self.world * nw   # this (rank, worker) consumer of n
        rng = random.Random(self.seed * 7919 + cid)
        images, captions, bad, epoch = [], [], {}, 0
        while self.epochs is None or epoch < self.epochs:
            good, seen = 0, {}                               # this epoch's usable samples and skips by cause
            for key, img, cap in self.raw_samples(epoch, cid, n):
                x, cap, why = self.decode(img, cap)
                if why:
                    bad[why] = bad.get(why, 0) + 1
                    seen[why] = seen.get(why, 0) + 1
                    continue
                good += 1
                if self.hflip and rng.random() < 0.5:
                    x, cap = flip(x, cap)
                images.append(x)
                captions.append(cap)
                if len(images) == self.batch_size:
                    yield to_tensor(np.stack(images)), captions, bad
                    images, captions, bad = [], [], {}
            if good == 0 and self.epochs is None:  # an endless stream that yields nothing would spin forever
                raise RuntimeError(no_usable_samples(seen, f"consumer {cid} of {n}"))
            epoch += 1
        if images or bad:  # a finite stream (tests) ends with its last, partial batch and counts
            x = to_tensor(np.stack(images)) if images else torch.empty(0, 3, self.image_size, self.image_size)
            yield x, captions, bad

    def decode(self, img, cap):
        """(image uint8 (H, W, 3), caption, None) for a usable sample, else (None, None, the cause)."""
        if img is None:
            return None, None, "no_image"
        if cap is None or not cap.strip():
            return None, None, "no_caption"
        try:
            x = load_image(io.BytesIO(img) if isinstance(img, bytes) else img, self.image_size)
        except Exception:
            return None, None, "bad_image"
        return x, " ".join(cap.split()), None


def no_usable_samples(counts, where):
    causes = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(counts.items())) or "no samples at all"
    return (f"error: the data has no usable sample ({where}): {causes}. A usable sample is an image that "
            f"decodes (jpg/png/webp/bmp) with a non-empty caption: KEY.jpg + KEY.txt in a shard, or a.jpg + a.txt "
            f"(or a captions.tsv line) in a folder.")


def check_source(dataset, data_dir, image_size):
    """Fail fast, before training: read the source until one usable sample turns up; if a whole pass finds
    none, stop with the counts by cause (without this check an endless stream of nothing would hang)."""
    counts = {}
    for x, _, bad in ImageTextStream(dataset, data_dir, 1, image_size, hflip=False, epochs=1):
        if len(x):
            return
        for k, v in bad.items():
            counts[k] = counts.get(k, 0) + v
    raise SystemExit(no_usable_samples(counts, data_dir))


MIN_CAPTIONS = 4  # fewer captions than this cannot make a tokenizer worth training


def tokenizer_for(dataset, data_dir, vocab_size, max_len, out, ddp, master, n_captions=50_000):
    """The run's tokenizer: <out>/tokenizer.json if it exists, else trained by rank 0 on a sample of the
    data's captions (plus the fake-score prompt) and saved there; other ranks wait and load it."""
    path = os.path.join(out, "tokenizer.json")
    if master and not os.path.exists(path):
        stream = ImageTextStream(dataset, data_dir, 1, 8, hflip=False)
        caps = []
        for _, _, cap in stream.raw_samples(0):
            if cap and cap.strip():
                caps.append(cap)
            if len(caps) >= n_captions:
                break
        if len(caps) < MIN_CAPTIONS:
            raise SystemExit(f"error: found {len(caps)} usable caption(s) in {data_dir}; a tokenizer needs at "
                             f"least {MIN_CAPTIONS}. Every image needs a non-empty caption.\n{CC3M_HELP}")
        os.makedirs(out, exist_ok=True)
        train_tokenizer(caps + [FAKE_PROMPT] * 10, vocab_size).save(path)
        print(f"trained a {vocab_size}-token tokenizer on {len(caps)} captions: {path}")
    if ddp:
        torch.distributed.barrier()
    return Tokenizer.load(path, max_len)


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    images, captions = shapes_batch(seed=0, index=0, batch_size=16)
    fig, axes = plt.subplots(4, 4, figsize=(10, 11))
    for ax, img, cap in zip(axes.flat, to_uint8(images), captions):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(cap, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig("shapes_preview.png", dpi=80)
    print("wrote shapes_preview.png")
