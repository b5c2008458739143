"""Prompts in, PNG grids out.

    python sample.py --steps 1                         # the default run's EMA weights, built-in prompts
    python sample.py --steps 1 2 4 8 50                # one column per step count
    python sample.py --prompt "a red circle left of a blue square" --n 4 --omega 3 --eta 1 --out my.png

Rows are prompts (n images each), columns step counts. An existing output file is never overwritten:
the grid goes to the next free name (grid-1.png, ...) and the script says so.
"""
import argparse
import os
import textwrap

import torch
from PIL import Image, ImageDraw

import data
import losses
import model as models
import sampler

DEFAULT_PROMPTS = [
    "a red circle",
    "two squares",
    "a blue triangle and a yellow circle",
    "a square left of a circle",
    "a green triangle above a pink square",
    "three circles",
    "a white square and a purple triangle",
    "a black circle below a triangle",
]
MAX_IMAGES = 512                                      # images per step count (prompts x --n): one grid row each
DEFAULT_CKPT = "runs/shapes/ckpt.pt"                  # your own run (python train.py)
SHIPPED_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "shapes_tiny_selfe.pt")
# ^ the weights in this repository (Self-E with --flow-target 0.25, 24,206 steps; EMA, fp16), used when you have no
#   run of your own


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (train.py, sample.py, evaluate.py, scripts.diagnose), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def check_sampling(p, args):
    """The sampler flags every script shares: one line for a bad value, before any work."""
    if args.eta is not None and not 0 <= args.eta <= 1:
        p.error("--eta must be in [0, 1] (0: deterministic, 1: DDIM-style fresh noise)")
    if args.omega is not None and args.omega < 0:
        p.error("--omega must be >= 0 (1: no guidance, 0: unconditional)")
    if any(s < 1 for s in args.steps):
        p.error("--steps must be positive integers")


def output_folder(ckpt_path, out=None):
    """Where a script writes what it measured of a checkpoint: --out, else the checkpoint's run folder; never the
    repository's checkpoints/ (the shipped weights' folder): there, eval/shipped/ instead."""
    if out:
        return out
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.join("eval", "shipped") if folder == os.path.dirname(SHIPPED_CKPT) else folder


def default_checkpoint():
    """Your own run's checkpoint if there is one, else the shipped weights (if this checkout has them)."""
    return DEFAULT_CKPT if os.path.exists(DEFAULT_CKPT) or not os.path.exists(SHIPPED_CKPT) else SHIPPED_CKPT


def load(path):
    """A checkpoint's EMA model (eval mode), tokenizer and config."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}. Train one first: python train.py "
                         f"(about 15 minutes on a CPU), or pass --ckpt PATH")
    ckpt = models.load_checkpoint(path)
    cfg = ckpt["config"]
    tok = data.Tokenizer(ckpt["tokenizer"], cfg["max_text_len"])
    return models.from_checkpoint(ckpt, tok.vocab_size), tok, cfg


def sampling_defaults(cfg, omega=None, eta=None, s_mode=None):
    """Guidance scale omega, noise eta and target time s_k: explicit values, else the run's stored --omega (named
    "cfg" in runs before 2026-11-30), else the method's default (sampler.DEFAULTS)."""
    d = sampler.DEFAULTS[cfg["method"]]
    stored = cfg.get("omega", cfg.get("cfg"))
    return dict(omega=omega if omega is not None else (stored or d["omega"]),
                eta=eta if eta is not None else d["eta"], s_mode=s_mode if s_mode is not None else d["s_mode"])


def s_mode_arg(v):
    """--s-mode: next, same, mid, or a number a in [0, 1] (sampler.target_time)."""
    if v in ("next", "same", "mid"):
        return v
    try:
        a = float(v)
    except ValueError:
        a = -1.0
    if not 0 <= a <= 1:
        raise argparse.ArgumentTypeError(f"{v!r}: use next, same, mid or a number in [0, 1]")
    return a


def make_generate(net, tok, cfg, omega=None, eta=None, s_mode=None, device="cpu"):
    """generate(prompts, steps, generator=None) -> images (N, 3, H, W) in [-1, 1], for evaluate.py. generator: the
    noise's (CPU) stream; None draws from torch's global one."""
    opts = sampling_defaults(cfg, omega, eta, s_mode)
    mu = losses.time_shift(cfg, net.grid)
    net = net.to(device)

    def generate(prompts, steps, generator=None, progress=False):
        shape = (3, cfg["image_size"], cfg["image_size"])
        return sampler.sample(net, tok(prompts), tok([""]), steps, mu, shape, omega=opts["omega"],
                              eta=opts["eta"], s_mode=opts["s_mode"], generator=generator, device=device,
                              progress=progress).cpu()
    return generate


def free_path(path):
    """path, or path-1, path-2, ... if it exists: never overwrite silently."""
    root, ext = os.path.splitext(path)
    k, out = 0, path
    while os.path.exists(out):
        k += 1
        out = f"{root}-{k}{ext}"
    if out != path:
        print(f"{path} exists; writing {out} instead")
    return out


def grid_image(images, prompts, steps_list, n, scale=4):
    """images: {steps: uint8 (P*n, H, W, 3)} -> one PIL grid, a column per step count, labels on top/left."""
    h = images[steps_list[0]].shape[1] * scale
    label_w, top, pad = 200, 16, 2
    W = label_w + len(steps_list) * (h + pad)
    H = top + len(prompts) * n * (h + pad)
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, steps in enumerate(steps_list):
        draw.text((label_w + j * (h + pad) + 2, 2), f"{steps} step" + ("s" if steps > 1 else ""), fill=(0, 0, 0))
        for i, img in enumerate(images[steps]):
            tile = Image.fromarray(img).resize((h, h), Image.NEAREST)
            grid.paste(tile, (label_w + j * (h + pad), top + i * (h + pad)))
    for i, p in enumerate(prompts):  # the whole prompt, wrapped to the label column (~32 characters a line)
        lines = textwrap.wrap(p, 32) or [""]
        y = top + i * n * (h + pad) + max(0, (n * (h + pad) - 12 * len(lines)) // 2)
        draw.multiline_text((4, y), "\n".join(lines), fill=(0, 0, 0), spacing=2)
    return grid


def write_grid(net, tok, cfg, prompts, steps_list, path, n=1, seed=0, device="cpu", **opts):
    """Sample every prompt n times at each step count (same noise per column, from a generator of its own: the
    process's random stream, a training run's included, is left as it was) and save the grid."""
    was_training = net.training
    net.eval()
    gen = make_generate(net, tok, cfg, device=device, **opts)
    captions = [p for p in prompts for _ in range(n)]
    images = {}
    for steps in steps_list:  # a progress bar appears for a long sampling (tqdm's delay: after 2 s)
        images[steps] = data.to_uint8(gen(captions, steps, torch.Generator().manual_seed(seed), progress=True))
    net.train(was_training)
    grid_image(images, prompts, steps_list, n).save(path)
    return images


def write_images(images, n, grid_path):
    """One PNG per image beside the grid: <grid name>_<steps>step_<prompt index>_<k>.png (the grid's name is
    new, so these never overwrite earlier ones)."""
    root = os.path.splitext(grid_path)[0]
    for steps, imgs in images.items():
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(f"{root}_{steps}step_{i // n:02d}_{i % n}.png")


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"default: {DEFAULT_CKPT} if it exists, else {SHIPPED_CKPT}")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: 8 built-in prompts")
    p.add_argument("--steps", type=int, nargs="+", default=[1])
    p.add_argument("--n", type=int, default=2, help="images per prompt")
    p.add_argument("--omega", type=float, default=None, help="guidance scale omega >= 0 (1 = none; paper: 5)")
    p.add_argument("--eta", type=float, default=None, help="0: deterministic (Eq. 22), 1: DDIM-style noise")
    p.add_argument("--s-mode", default=None, type=s_mode_arg,
                   help="target time s_k: next (t_{k+1}), same (t_k), mid, or a in [0, 1]: t_{k+1} + a (t_k - t_{k+1})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png",
                   help="a .png/.jpg file for the grid, or a folder: the grid plus one PNG per image")
    args = p.parse_args(argv)
    check_sampling(p, args)
    prompts = args.prompt or DEFAULT_PROMPTS
    if args.n < 1 or len(prompts) * args.n > MAX_IMAGES:
        p.error(f"--n must be at least 1 and make at most {MAX_IMAGES} images per step count ({len(prompts)} "
                f"prompts x --n {args.n} = {len(prompts) * args.n}); for more, run again with another --seed")
    ext = os.path.splitext(args.out)[1].lower()
    folder = os.path.isdir(args.out) or not ext
    if not folder and ext not in Image.registered_extensions():
        p.error(f"--out {args.out}: unknown image extension {ext!r}; use .png or .jpg, or a folder")
    try:  # the folder the output goes into, made now, before any sampling; refused if it cannot be made
        os.makedirs(args.out if folder else os.path.dirname(args.out) or ".", exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot make its folder ({e.strerror})")
    if args.ckpt is None:
        args.ckpt = default_checkpoint()
        print(f"using {'your run' if args.ckpt == DEFAULT_CKPT else 'the shipped weights'}: {args.ckpt}")
    net, tok, cfg = load(args.ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for line in (line for prompt in prompts for line in tok.notices(prompt)):
        print(line)
    if folder:
        out = free_path(os.path.join(args.out, "grid.png"))
    else:
        out = free_path(args.out)
    images = write_grid(net, tok, cfg, prompts, args.steps, out, n=args.n, seed=args.seed, device=device,
                        omega=args.omega, eta=args.eta, s_mode=args.s_mode)
    if folder:
        write_images(images, args.n, out)
    opts = sampling_defaults(cfg, args.omega, args.eta, args.s_mode)
    print(f"wrote {out}" + (f" and {len(prompts) * args.n * len(args.steps)} single images beside it" if folder else "")
          + f": {len(prompts)} prompts x {args.n}, steps {args.steps}, omega {opts['omega']}, eta {opts['eta']}, "
          f"s_k = {opts['s_mode']}")


if __name__ == "__main__":
    main()
