"""Train Self-E (or the plain flow-matching baseline) from scratch. One readable loop.

    python train.py                                   # shapes, 15 minutes on a CPU (or a GPU if there is one)
    python train.py --method flow                     # the same network trained as plain flow matching
    python train.py --resume                          # continue the run in --out exactly where it stopped
    python train.py --dataset cc3m --data-dir DIR --model small            # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --dataset cc3m --data-dir DIR --model base
    python train.py --max-steps 20 --batch-size 8 --out /tmp/smoke         # a CPU smoke run

A run folder (--out) holds ckpt.pt (everything needed to resume or sample), config.json, tokenizer.json,
log.jsonl (loss parts per step) and grids/ (samples at 1, 2, 4, 8 steps every --sample-every steps).
Checkpoints are saved from the plain module (never compiled or DDP-wrapped), atomically, and loaded with
torch.load(weights_only=True).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import losses
import model as models
import sample


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/<dataset>, runs/<dataset>-flow for flow)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=200_000)
    g.add_argument("--max-minutes", type=float, default=None,
                   help="time budget; the LR decays over it (default 15 for shapes, none otherwise)")
    g.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="what --max-minutes counts: wall-clock, or this process's CPU time (a run that shares "
                        "the CPU with other work then still gets the same compute)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", choices=["shapes", "cc3m", "folder"])
    g.add_argument("--data-dir", default=None, help="cc3m: img2dataset webdataset shards; folder: images + .txt")
    g.add_argument("--image-size", type=int, default=None, help="default 32 for shapes, 64 otherwise")
    g.add_argument("--batch-size", type=int, default=64, help="per process, per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--workers", type=int, default=None, help="dataloader workers (default 0 on CPU, 4 on GPU)")
    g.add_argument("--max-text-len", type=int, default=None, help="caption tokens (default 16 for shapes, 32 else)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (shapes needs ~100)")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="null-prompt rate, for CFG (ours: 10%%)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(models.MODELS))
    g.add_argument("--prediction", default="x", choices=["x", "v"],
                   help="the head predicts x0 (default; V = (x_t - x0)/t) or V directly (the paper's)")
    g.add_argument("--dim", type=int, default=None, help="override the size's width")
    g.add_argument("--depth", type=int, default=None, help="override the size's number of blocks")
    g.add_argument("--heads", type=int, default=None, help="override the size's attention heads")
    g.add_argument("--patch", type=int, default=None, help="override the size's patch size")
    g.add_argument("--conv-head", type=int, default=None, help="k > 0: k features per pixel, then a 3x3 conv")
    g.add_argument("--qk-norm", default=None, action=argparse.BooleanOptionalAction, help="RMSNorm on q and k")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="selfe", choices=["selfe", "flow"])
    g.add_argument("--tau-anneal", type=float, default=0.4,
                   help="fraction of training over which tau goes 0 -> 1 (paper: 300k of 710k)")
    g.add_argument("--no-energy-preserving", action="store_true", help="ablation: plain Eq. 16 instead of Eq. 20")
    g.add_argument("--fake-start", type=float, default=None,
                   help="switch the fake-score term on at this fraction of training (paper: 0.77); off if unset")
    g.add_argument("--mu", type=float, default=None, help="time shift (default from the image token count)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adam", choices=["adam", "muon"],
                   help="muon: torch.optim.Muon on the blocks' 2-D weights (RMS matched to Adam's), Adam on the rest")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--lr-min", type=float, default=1e-5)
    g.add_argument("--warmup", type=int, default=100, help="warm-up steps (paper: 1000)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay, warmed up as (1+n)/(10+n) (paper: 0.9999)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, else fp32")
    g.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction, help="default on for CUDA")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--sample-every", type=int, default=500, help="sample grids at 1/2/4/8 steps (0: never)")
    g.add_argument("--ckpt-every", type=int, default=250)
    g.add_argument("--cfg", type=float, default=None,
                   help="guidance scale stored for sampling (default 1.0 for selfe, 2.0 for flow: bench15)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.given = sorted({a.dest for a in p._actions for x in argv if x.split("=")[0] in a.option_strings})
    args.image_size = args.image_size or (32 if args.dataset == "shapes" else 64)
    args.max_text_len = args.max_text_len or (16 if args.dataset == "shapes" else 32)
    if args.max_minutes is None:
        args.max_minutes = 15.0 if args.dataset == "shapes" else 0.0
    args.out = args.out or f"runs/{args.dataset}" + ("-flow" if args.method == "flow" else "")
    args.arch = {k: getattr(args, k) for k in ("dim", "depth", "heads", "patch", "conv_head", "qk_norm")
                 if getattr(args, k) is not None}  # overrides of the named size, kept in the checkpoint's config
    return args


def lr_at(step, progress, args):
    """Linear warm-up, then linear decay lr -> lr_min over training (paper S.2)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr + (args.lr_min - args.lr) * min(1.0, progress)


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def make_optimizers(raw, args, device_type):
    """Adam (paper S.2: betas 0.9, 0.95) on everything; or Muon on the transformer blocks' 2-D weights and
    Adam on the rest (embeddings, biases, norms, time MLPs, input and output layers)."""
    hidden = [p for name, p in raw.named_parameters() if p.ndim == 2 and ".blocks." in f".{name}"]
    ids = {id(p) for p in hidden} if args.optimizer == "muon" else set()
    rest = [p for p in raw.parameters() if id(p) not in ids]
    opts = [torch.optim.Adam(rest, lr=args.lr, betas=(0.9, 0.95), fused=device_type == "cuda")]
    if ids:
        opts.append(torch.optim.Muon(hidden, lr=args.lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"))
    return opts


def save_checkpoint(path, **state):
    """Atomic: write a temporary file, then rename it over the old checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """Load a checkpoint made by this script; weights_only=True: a checkpoint cannot run code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint of this project ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or not {"model", "config", "tokenizer"} <= set(ckpt):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (no model/config/tokenizer in it)")
    return ckpt


def main(argv=None):
    args = get_args(argv)
    # ---- processes and devices: DDP when torchrun sets RANK ----
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    else:
        rank, world, local = 0, 1, 0
    master = rank == 0
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    args.precision = args.precision or ("bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    args.compile = device_type == "cuda" if args.compile is None else args.compile
    workers = args.workers if args.workers is not None else (4 if device_type == "cuda" else 0)
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # ---- the run folder: resume, or refuse to clobber ----
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"error: --resume but there is no {ckpt_path}; start a run without --resume")
        ckpt = load_checkpoint(ckpt_path)
        # the run's own config, except what this command line sets explicitly among these
        may_change = {"max_steps", "max_minutes", "log_every", "sample_every", "ckpt_every", "workers", "compile",
                      "precision"}
        given = {k: getattr(args, k) for k in args.given if k in may_change}
        args = argparse.Namespace(**{**vars(args), **ckpt["config"], **given, "resume": True})
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue it or --out to start a new run")
    if master:
        os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)

    # ---- data and tokenizer ----
    if ckpt is not None:
        tok = data.Tokenizer(ckpt["tokenizer"], args.max_text_len)
    elif args.dataset == "shapes":
        tok = data.train_tokenizer(data.shapes_captions(), args.vocab_size)
        tok = data.Tokenizer(tok.json, args.max_text_len)
    else:
        data.list_sources(args.dataset, args.data_dir)  # fail fast, on every rank, if there is no data
        tok = data.tokenizer_for(args.dataset, args.data_dir, args.vocab_size, args.max_text_len, args.out,
                                 ddp, master)
    start_step = ckpt["step"] if ckpt else 0
    if args.dataset == "shapes":  # batch b is a pure function of (seed, b): resume continues the same stream
        dataset = data.ShapesStream(args.seed + 1000 * rank, args.batch_size, args.image_size,
                                    start=start_step * args.grad_accum)
    else:  # shards: a resumed run starts a fresh shuffle of the data (seeded by the step)
        dataset = data.ImageTextStream(args.dataset, args.data_dir, args.batch_size, args.image_size,
                                       rank, world, seed=args.seed + start_step)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                              pin_memory=device_type == "cuda", persistent_workers=workers > 0))
    null_ids = tok([""]).to(device)                                             # (1, L): the empty prompt phi

    # ---- model, EMA, optimiser ----
    torch.manual_seed(args.seed)
    raw = models.build(args.model, tok.vocab_size, args.max_text_len, args.image_size, args.prediction,
                       **args.arch).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False)
    opts = make_optimizers(raw, args, device_type)
    gen = torch.Generator().manual_seed(args.seed + rank)  # times, noise, caption dropout: one stream per rank
    elapsed = 0.0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        for o, state in zip(opts, ckpt["opt"] if isinstance(ckpt["opt"], list) else [ckpt["opt"]]):
            o.load_state_dict(state)
        gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        elapsed = ckpt["elapsed"]
    mu = args.mu if args.mu is not None else losses.shift_mu(raw.grid ** 2)
    live = torch.compile(raw) if args.compile else raw       # no-grad passes use the plain (compiled) module
    ema_eval = torch.compile(ema) if args.compile else ema
    net = torch.nn.parallel.DistributedDataParallel(live, device_ids=[local] if device_type == "cuda" else None) \
        if ddp else live                                      # the gradient pass goes through DDP
    n_params = sum(p.numel() for p in raw.parameters())
    if master:
        print(f"{args.method} | model {args.model}: {n_params / 1e6:.2f}M params | {args.dataset} {args.image_size}px"
              f" | device {device} x{world} | {args.precision} | compile {args.compile} | out {args.out}")
        if args.max_minutes:
            print(f"training for {args.max_minutes:g} minutes (or {args.max_steps} steps)"
                  + ("; on a 2-core CPU expect the prompts' colours in roughly the right places after 15 minutes"
                     " (clean shapes need longer; see README)" if device_type == "cpu" else ""))
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        tok.save(os.path.join(args.out, "tokenizer.json"))

    def checkpoint(step):
        rngs = [gen.get_state()]
        if ddp:  # every rank's generator state, so that a resumed DDP run continues each stream
            rngs = [None] * world
            dist.all_gather_object(rngs, gen.get_state())
        if master:
            save_checkpoint(ckpt_path, model=raw.state_dict(), ema=ema.state_dict(),
                            opt=[o.state_dict() for o in opts],
                            step=step, elapsed=elapsed, rng=rngs, config=vars(args),
                            tokenizer=tok.json)

    def grid(step):  # EMA samples of a few prompts at 1, 2, 4, 8 steps
        sample.write_grid(ema, tok, vars(args), sample.DEFAULT_PROMPTS[:6], [1, 2, 4, 8],
                          os.path.join(args.out, "grids", f"step{step:07d}.png"), device=device)

    # ---- the loop ----
    B = args.batch_size
    clock = time.process_time if args.clock == "cpu" else time.time
    step, rider, t_start = start_step, None, clock() - elapsed
    bar = tqdm(total=None if args.max_minutes else args.max_steps, initial=step, disable=not master,
               dynamic_ncols=True, unit="step")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    t_log, imgs_log, skipped = time.time(), 0, {}
    while step < args.max_steps:
        elapsed = clock() - t_start
        if ddp:  # every rank must agree on the time (LR, stopping)
            e = torch.tensor([elapsed], device=device)
            dist.all_reduce(e, op=dist.ReduceOp.MAX)
            elapsed = e.item()
        if args.max_minutes and elapsed >= args.max_minutes * 60:
            break
        progress = max(step / args.max_steps, elapsed / (args.max_minutes * 60) if args.max_minutes else 0.0)
        lr = lr_at(step, progress, args)
        for o in opts:
            for group in o.param_groups:
                group["lr"] = lr
        tau = losses.tau_schedule(progress, args.tau_anneal)
        use_fake = args.method == "selfe" and args.fake_start is not None and progress >= args.fake_start
        parts_sum = {}
        for micro in range(args.grad_accum):
            x0, captions, bad = next(loader)                                         # (B, 3, H, W), B strings
            for k, v in bad.items():                                                 # broken samples, counted
                skipped[k] = skipped.get(k, 0) + v
            drop = torch.rand(B, generator=gen) < args.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            ids = tok(captions).to(device)                                           # (B, L)
            x0 = x0.to(device, non_blocking=True)
            t = losses.sample_t(B, mu, gen)
            if args.method == "selfe":
                s, order = losses.sample_s(t, tau, gen)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            eps2 = torch.randn(x0.shape, generator=gen).to(device)
            t = t.to(device)
            sync = contextlib.nullcontext() if not ddp or micro == args.grad_accum - 1 else net.no_sync()
            with sync:
                with autocast:
                    if args.method == "flow":
                        loss, parts, landing = losses.flow_loss(net, x0, ids, t, eps)
                    else:
                        fake = None
                        if use_fake:
                            fake_ids = tok(["fake image " + c for c in captions]).to(device)
                            fake = dict(ids=fake_ids, rider=rider)
                        loss, parts, landing = losses.selfe_loss(
                            net, ema_eval, x0, ids, null_ids, t, s.to(device), order.to(device),
                            eps, eps2, fake=fake, energy_preserving=not args.no_energy_preserving,
                            live=live)
                        if use_fake and landing is not None:  # this step's landings train the fake branch next step
                            n = B // 4
                            rider = dict(x=landing["x"][:n], s=landing["s"][:n], x0_hat=landing["x0_hat"][:n],
                                         ids=fake_ids[landing["jump"][:n]])
                (loss / args.grad_accum).backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        ema_update(ema, raw, min(args.ema, (1 + step) / (10 + step)))
        step += 1
        imgs_log += B * args.grad_accum * world

        if step % args.log_every == 0 or step == args.max_steps:
            keys = sorted(parts_sum)
            vals = torch.tensor([parts_sum[k] for k in keys] + [loss.item()], device=device)
            if ddp:  # logged numbers are averaged across ranks
                dist.all_reduce(vals, op=dist.ReduceOp.AVG)
            rate = imgs_log / (time.time() - t_log)
            t_log, imgs_log = time.time(), 0
            if master:
                rec = dict(step=step, loss=vals[-1].item(), **{k: round(v, 5) for k, v in zip(keys, vals.tolist())},
                           lr=lr, tau=round(tau, 4), fake_on=use_fake, grad_norm=round(grad_norm.item(), 4),
                           img_per_s=round(rate, 1), minutes=round(elapsed / 60, 2), skipped=skipped)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({"loss": f"{rec['loss']:.4f}", "data": f"{rec['data']:.4f}",
                                 "self": f"{rec['self']:.4f}", "img/s": f"{rate:.0f}", "tau": f"{tau:.2f}",
                                 "min": f"{elapsed / 60:.1f}" + (f"/{args.max_minutes:g}" if args.max_minutes else "")})
        bar.update(1)
        if master and args.sample_every and step % args.sample_every == 0:
            grid(step)
        if step % args.ckpt_every == 0:
            elapsed = clock() - t_start
            checkpoint(step)
    elapsed = clock() - t_start
    checkpoint(step)
    bar.close()
    if master:
        grid(step)
        print(f"done: {step} steps in {elapsed / 60:.1f} min; checkpoint {ckpt_path}; "
              f"try: python sample.py --ckpt {ckpt_path} --steps 1 2 4 8")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
