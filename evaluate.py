"""ShapesEval: GenEval in miniature, for the shapes world, with no pretrained network.

A fixed set of evaluation prompts (50 per task by default, as README and the benchmark use; GenEval's six
tasks), N images per prompt.
An analytic detector finds the objects of each image (foreground segmentation against the background,
connected components, shape by template IoU, colour from the object's own pixels), and GenEval's rules
judge each image right or wrong. A task's score is the mean over its images; overall is the unweighted
mean of the six task scores. Beside it, a sliced Wasserstein distance on pixel patches against ground-truth
renders of the same prompts (with its real-vs-real floor) sees blur, noise and colour drift that
alignment misses.

    python evaluate.py --reference                          # ground-truth renders: the calibration row
    python evaluate.py --noise                              # Gaussian noise and blank images: the floor
    python evaluate.py --ckpt runs/shapes/ckpt.pt --steps 1 2 4 8 50
Each run prints a table and writes <out>/shapes_eval.json (and, with several step counts, shapes_eval.png).
"""
import argparse
import json
import os
import random
import time

import numpy as np
import torch

import data
import sample

EVAL_SEED = 2_000_003        # the prompt set; training streams use small seeds and never this one
REFERENCE_SEED = 3_000_017   # ground-truth renders of the prompts (a second seed gives the floor)
DETECT_THRESHOLD = 0.6       # a component is an object when its template IoU exceeds this (GenEval: 0.3)
COUNT_THRESHOLD = 0.7        # stricter for the counting task, as GenEval's (0.9)
FG_THRESHOLD = 48.0          # RGB distance from the background above which a pixel is foreground
IMAGE_SIZE = 32              # the evaluation's image size (the detector's thresholds are tuned to it)
PALETTE = np.array(list(data.COLORS.values()), dtype=np.float32)
COLOR_NAMES = list(data.COLORS)


# -----------------------------------------------------------------------------
# the prompt set

def eval_prompts(per_task=50, seed=EVAL_SEED):
    """[(caption, spec)], per_task for each of the six tasks. Prompts may repeat (three shapes give three
    single-object prompts); each repeat draws its own images, like more images per prompt."""
    rng = random.Random(seed)
    return [data.make_example(task, rng)[1:] for task in data.TASKS for _ in range(per_task)]


def reference_images(prompts, n_per_prompt, image_size=32, seed=REFERENCE_SEED):
    """Ground-truth renders: n_per_prompt random scenes satisfying each prompt's spec, uint8 (N, H, W, 3)."""
    rng = random.Random(seed)
    return np.stack([data.render(data.scene_from_spec(spec, rng, image_size), image_size)
                     for _, spec in prompts for _ in range(n_per_prompt)])


# -----------------------------------------------------------------------------
# the detector

def _components(fg):
    """4-connected components of a boolean batch (N, H, W): int labels (0 = background), by min-propagation."""
    n, h, w = fg.shape
    big = n * h * w + 1
    lab = np.where(fg, np.arange(1, n * h * w + 1).reshape(n, h, w), big)
    while True:
        new = lab.copy()
        new[:, 1:, :] = np.minimum(new[:, 1:, :], lab[:, :-1, :])   # from above
        new[:, :-1, :] = np.minimum(new[:, :-1, :], lab[:, 1:, :])  # from below
        new[:, :, 1:] = np.minimum(new[:, :, 1:], lab[:, :, :-1])   # from the left
        new[:, :, :-1] = np.minimum(new[:, :, :-1], lab[:, :, 1:])  # from the right
        new = np.where(fg, new, big)
        if np.array_equal(new, lab):
            return np.where(fg, lab, 0)
        lab = new


def _templates(h, w):
    """Ideal masks of each shape filling an h x w box, sampled at pixel centres."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = w / 2, h / 2
    return {
        "circle": ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1,
        "square": np.ones((h, w), bool),
        "triangle": np.abs(x - cx) <= y / h * w / 2,  # apex at the top centre, base at the bottom
    }


def detect(images):
    """Objects in each image: a list (per image) of dicts with shape, color, box, conf.

    images: uint8 (N, H, W, 3). conf is the IoU of the object's mask with the best shape template."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rgb = images.astype(np.float32)
    fg = np.linalg.norm(rgb - np.array(data.BACKGROUND, np.float32), axis=-1) > FG_THRESHOLD  # (N, H, W)
    labels = _components(fg)
    keys, inverse, counts = np.unique(labels.ravel(), return_inverse=True, return_counts=True)
    min_area, max_side = 0.02 * h * w, 0.6 * max(h, w)
    dets = [[] for _ in range(n)]
    for k, key in enumerate(keys):
        if key == 0 or counts[k] < min_area:
            continue
        flat = np.flatnonzero(inverse == k)
        i, ys, xs = np.unravel_index(flat, labels.shape)
        i = int(i[0])
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if max(y1 - y0, x1 - x0) > max_side:
            continue
        mask = labels[i, y0:y1, x0:x1] == key
        ious = {name: (mask & t).sum() / (mask | t).sum() for name, t in _templates(y1 - y0, x1 - x0).items()}
        shape = max(ious, key=ious.get)
        # colour from the object's own pixels: the interior if it has one (edges are blended)
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]; inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]; inner[:, :-1] &= mask[:, 1:]
        pix = rgb[i, y0:y1, x0:x1][inner if inner.sum() >= 3 else mask]
        color = COLOR_NAMES[int(np.argmin(np.linalg.norm(PALETTE - np.median(pix, 0), axis=1)))]
        dets[i].append(dict(shape=shape, color=color, box=(float(x0), float(y0), float(x1), float(y1)),
                            conf=float(ious[shape])))
    return dets


# -----------------------------------------------------------------------------
# GenEval's rules

def judge(dets, spec):
    """Is this image right for this prompt spec? (GenEval's rules, on our detections.)"""
    threshold = COUNT_THRESHOLD if spec["task"] == "counting" else DETECT_THRESHOLD
    found = []
    for req in spec["include"]:
        objs = sorted((d for d in dets if d["shape"] == req["shape"] and d["conf"] > threshold),
                      key=lambda d: -d["conf"])
        if len(objs) < req["count"]:                       # at least count of this shape
            return False
        if spec["exact"] and len(objs) > req["count"]:     # counting: exactly count
            return False
        if req["color"] and any(d["color"] != req["color"] for d in objs[:req["count"]]):
            return False                                   # colour, on the object's own pixels
        found.append(objs)
    if spec["position"]:
        rel, a, b = spec["position"]
        if rel not in data.relations(found[a][0]["box"], found[b][0]["box"]):  # from box centres
            return False
    return True


def score(images, prompts, n_per_prompt):
    """Per-task and overall scores of images (N, H, W, 3) made n_per_prompt at a time for prompts."""
    dets = detect(images)
    right = {t: [] for t in data.TASKS}
    for j, d in enumerate(dets):
        spec = prompts[j // n_per_prompt][1]
        right[spec["task"]].append(judge(d, spec))
    out = {t: float(np.mean(v)) for t, v in right.items() if v}
    out["overall"] = float(np.mean([out[t] for t in data.TASKS if t in out]))  # unweighted mean of tasks
    return out


def spread(images):
    """How much single-object images vary: the std over images of the best detection's centre x, centre y and size
    (its longer side), averaged over the three, in pixels (images without a detection left out). A sampler that
    collapses, drawing one object in one place whatever the noise, has a small spread; it is read against the
    renderer's own (`evaluate`: spread / the renders' spread, 1 for the data)."""
    boxes = [max(d, key=lambda o: o["conf"])["box"] for d in detect(images) if d]
    if len(boxes) < 2:
        return 0.0
    b = np.array(boxes)
    feats = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])])
    return float(feats.std(1).mean())


# -----------------------------------------------------------------------------
# a distribution distance that needs no pretrained network

def patch_swd(a, b, patch=4, n_patches=20000, n_proj=256, seed=0):
    """Sliced Wasserstein-2 distance between the 4x4 RGB patches of two image sets (x 100), summed over
    the raw patches (colour) and the patches minus their mean colour (structure: edges, blur, noise).

    a, b: uint8 (N, H, W, 3)."""
    g = np.random.default_rng(seed)

    def patches(x):
        x = torch.from_numpy(np.ascontiguousarray(x)).float().permute(0, 3, 1, 2) / 255  # (N, 3, H, W)
        p = torch.nn.functional.unfold(x, patch).transpose(1, 2)                         # (N, T, 3*p*p)
        p = p.reshape(-1, 3, patch * patch)
        p = p[torch.from_numpy(g.choice(len(p), n_patches, replace=len(p) < n_patches))]
        return p.flatten(1), (p - p.mean(-1, keepdim=True)).flatten(1)                  # raw, high-pass

    def swd(pa, pb):
        proj = torch.from_numpy(g.standard_normal((pa.shape[1], n_proj))).float()
        proj /= proj.norm(dim=0, keepdim=True)
        sa, sb = (pa @ proj).sort(0).values, (pb @ proj).sort(0).values                # (n_patches, n_proj)
        return float(((sa - sb) ** 2).mean(0).sqrt().mean() * 100)

    (ra, ha), (rb, hb) = patches(a), patches(b)
    return swd(ra, rb) + swd(ha, hb)


# -----------------------------------------------------------------------------
# evaluation of a generator, tables, plots

def as_uint8(images):
    return data.to_uint8(images) if torch.is_tensor(images) else np.asarray(images, dtype=np.uint8)


def evaluate(generate, steps_list, per_task=50, n_per_prompt=4, image_size=32, seed=0, batch=500, swd=True):
    """Score generate(prompts, steps) -> images at each step count: {steps: {task: score, overall, swd, spread}}:
    swd the patch distance to the renders, spread the single-object images' spread against the renders' (both see a
    collapse that the task scores do not). swd=False: without both, the slow part of a small evaluation.

    images: uint8 (N, H, W, 3) or a float tensor (N, 3, H, W) in [-1, 1]."""
    prompts = eval_prompts(per_task)
    captions = [c for c, _ in prompts for _ in range(n_per_prompt)]
    ref = reference_images(prompts, n_per_prompt, image_size) if swd else None
    single = [j for j in range(len(captions)) if prompts[j // n_per_prompt][1]["task"] == "single_object"]
    ref_spread = max(spread(ref[single]), 1e-6) if swd else None
    rows = {}
    for steps in steps_list:
        torch.manual_seed(seed)  # the same noise for every step count
        t0 = time.time()
        images = np.concatenate([as_uint8(generate(captions[i:i + batch], steps))
                                 for i in range(0, len(captions), batch)])
        rows[str(steps)] = dict(score(images, prompts, n_per_prompt), seconds=round(time.time() - t0, 1))
        if swd:
            rows[str(steps)].update(swd=patch_swd(images, ref), spread=round(spread(images[single]) / ref_spread, 4))
    return rows


def floor_rows(per_task=50, n_per_prompt=4, image_size=32, noise=False):
    """The calibration rows: ground-truth renders (and their SWD floor), or noise and blank images."""
    prompts = eval_prompts(per_task)
    ref = reference_images(prompts, n_per_prompt, image_size)
    if not noise:
        ref2 = reference_images(prompts, n_per_prompt, image_size, seed=REFERENCE_SEED + 1)
        return {"reference": dict(score(ref2, prompts, n_per_prompt), swd=patch_swd(ref2, ref))}
    g = torch.Generator().manual_seed(0)
    noise_img = as_uint8(torch.randn(len(ref), 3, image_size, image_size, generator=g))
    blank = np.broadcast_to(np.array(data.BACKGROUND, np.uint8), ref.shape).copy()
    return {"noise": dict(score(noise_img, prompts, n_per_prompt), swd=patch_swd(noise_img, ref)),
            "blank": dict(score(blank, prompts, n_per_prompt), swd=patch_swd(blank, ref))}


def table(rows):
    cols = list(data.TASKS) + ["overall", "swd", "spread"]
    lines = ["| " + " | ".join(["steps"] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        cells = [("-" if c not in r else f"{r[c]:.2f}" if c != "overall" and c not in data.TASKS else f"{r[c]:.3f}")
                 for c in cols]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def plot(rows, path, reference=None, title="ShapesEval"):
    """Overall score against steps (log x); rows may be {label: {steps: row}} for several lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, r in rows.items():
        steps = [int(s) for s in r]
        ax.plot(steps, [r[str(s)]["overall"] for s in steps], "o-", label=label)
    if reference is not None:
        ax.axhline(reference, ls="--", c="gray", label="ground truth")
    ax.set_xscale("log")
    steps = sorted({int(s) for r in rows.values() for s in r})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("ShapesEval overall")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = sample.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", action="store_true", help="score ground-truth renders (calibration)")
    p.add_argument("--noise", action="store_true", help="score Gaussian noise and blank images (floor)")
    p.add_argument("--ckpt", help="checkpoint to generate with (train.py's ckpt.pt)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50])
    p.add_argument("--per-task", type=int, default=50, help="prompts per task (the benchmark's and README's)")
    p.add_argument("--n", type=int, default=4, help="images per prompt (GenEval: 4)")
    p.add_argument("--omega", type=float, default=None,
                   help="guidance scale omega (default: the run's --omega, else the method's, sampler.DEFAULTS)")
    p.add_argument("--eta", type=float, default=None, help="sampler noise 0..1 (default: the method's, sampler.DEFAULTS)")
    p.add_argument("--s-mode", default=None, type=sample.s_mode_arg,
                   help="target time s_k: next (t_{k+1}), same (t_k), mid, or a in [0, 1]: t_{k+1} + a (t_k - t_{k+1})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's run folder; eval/shipped for "
                                               "the shipped weights; eval/ without --ckpt)")
    args = p.parse_args(argv)
    if not (args.reference or args.noise or args.ckpt):
        p.error("say what to score: --reference, --noise or --ckpt PATH")
    sample.check_sampling(p, args)
    if args.per_task < 1 or args.n < 1:
        p.error("--per-task and --n must be positive")
    out = sample.output_folder(args.ckpt, args.out) if args.ckpt else args.out or "eval"
    os.makedirs(out, exist_ok=True)
    rows, size = {}, IMAGE_SIZE
    if args.ckpt:
        model, tok, cfg = sample.load(args.ckpt)
        if cfg.get("dataset", "shapes") != "shapes" or cfg["image_size"] != IMAGE_SIZE:
            p.error(f"{args.ckpt} makes {cfg['image_size']} px images of {cfg.get('dataset')!r}; ShapesEval scores "
                    f"{IMAGE_SIZE} px shapes (train with: python train.py --dataset shapes)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = sample.make_generate(model, tok, cfg, omega=args.omega, eta=args.eta, s_mode=args.s_mode,
                                   device=device)
        rows.update(evaluate(gen, args.steps, args.per_task, args.n, size, args.seed))
    if args.reference:
        rows.update(floor_rows(args.per_task, args.n, size))
    if args.noise:
        rows.update(floor_rows(args.per_task, args.n, size, noise=True))
    print(table(rows))
    with open(os.path.join(out, "shapes_eval.json"), "w") as f:
        json.dump(dict(rows=rows, args=vars(args)), f, indent=1)
    steps_rows = {k: v for k, v in rows.items() if k.isdigit()}
    if len(steps_rows) > 1:
        plot({os.path.basename(out): steps_rows}, os.path.join(out, "shapes_eval.png"))
    print(f"wrote {out}/shapes_eval.json")


if __name__ == "__main__":
    main()
