"""Train Self-E (or the baselines: flow matching, MeanFlow) from scratch. One readable loop.

    python train.py                                   # shapes, 15 minutes on a CPU (or a GPU if there is one)
    python train.py --method flow                     # the same network trained as plain flow matching
    python train.py --method meanflow                 # ... or as MeanFlow, the native few-step baseline
    python train.py --resume                          # continue the run in --out exactly where it stopped
    python train.py --dataset cc3m --data-dir DIR --model small            # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --dataset cc3m --data-dir DIR --model base
    python train.py --max-steps 20 --batch-size 8 --out /tmp/smoke         # a CPU smoke run

A run folder (--out) holds ckpt.pt (everything needed to resume or sample), config.json, tokenizer.json,
log.jsonl (loss parts per step) and grids/ (samples at 1, 2, 4, 8 steps every --sample-every steps).
Checkpoints are saved from the plain module (never compiled or DDP-wrapped), atomically, and loaded with
torch.load(weights_only=True). The page reads top to bottom: the flags, the pieces the run is built from,
then main: the setup and one loop.
"""
import argparse
import contextlib
import copy
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import levers
import losses
import model as models
import sample

ARCH = ("dim", "depth", "heads", "patch", "time_scale")  # network flags, kept in config["arch"]
# flags a resumed run may change; every other flag is the run's own
MAY_CHANGE = {"max_steps", "max_minutes", "log_every", "sample_every", "ckpt_every", "workers", "compile", "precision",
              "snapshots", "snapshot_steps"}


# -----------------------------------------------------------------------------
# the flags

def check_args(p, args):
    """Bad values fail here, with one line naming the flag, before any work starts."""
    dim, depth, heads, patch = (args.arch[k] for k in ("dim", "depth", "heads", "patch"))
    for bad, msg in [
        (args.batch_size < 1, "--batch-size must be at least 1"),
        (args.grad_accum < 1, "--grad-accum must be at least 1"),
        (args.max_steps < 1, "--max-steps must be at least 1"),
        (args.max_minutes is not None and args.max_minutes < 0, "--max-minutes must be >= 0 (0: no time budget)"),
        (args.lr <= 0 or args.lr_min < 0, "--lr must be > 0 and --lr-min >= 0"),
        (args.warmup < 0, "--warmup must be >= 0"),
        (args.dataset != "shapes" and not args.data_dir,
         f"--dataset {args.dataset} needs --data-dir DIR (README: GPU and CC3M)"),
        (args.clip <= 0, "--clip must be > 0 (the gradient-norm cap; there is no 'off')"),
        (args.max_text_len is not None and args.max_text_len < 1, "--max-text-len must be at least 1 token"),
        (args.vocab_size < 2, "--vocab-size must be at least 2 (the BPE also needs room for the shapes words: ~100)"),
        (args.omega is not None and args.omega < 0, "--omega must be >= 0 (1: no guidance, 0: unconditional)"),
        (not 0 <= args.ema < 1, "--ema must be in [0, 1)"),
        (not 0 <= args.caption_dropout < 1, "--caption-dropout must be in [0, 1)"),
        (args.fake_start is not None and not 0 <= args.fake_start <= 1, "--fake-start must be in [0, 1]"),
        (not 0 <= args.fake_k <= 1, "--fake-k must be in [0, 1]"),
        (not 0 <= args.shortcut <= 1 or not 0 <= args.flow_target <= 1 or args.shortcut + args.flow_target > 1,
         "--shortcut and --flow-target must be shares in [0, 1] that add up to at most 1"),
        (args.flow_steps < 1 or not 0 <= args.flow_below <= 1, "--flow-steps must be >= 1, --flow-below in [0, 1]"),
        (args.method != "selfe" and (args.shortcut or args.flow_target), "--shortcut and --flow-target are Self-E's levers (--method selfe)"),
        (args.method != "meanflow" and args.meanflow_v_loss, "--meanflow-v-loss is a MeanFlow option (--method meanflow)"),
        (args.log_every < 1 or args.ckpt_every < 1 or args.sample_every < 0,
         "--log-every and --ckpt-every must be at least 1, --sample-every at least 0"),
        (min(dim, depth, heads, patch) < 1, "--dim, --depth, --heads and --patch must be at least 1"),
        (args.arch.get("time_scale", 1) <= 0, "--time-scale must be > 0"),
        (dim % max(heads, 1), f"--dim {dim} must be a multiple of --heads {heads}"),
        (args.image_size < 1 or args.image_size % max(patch, 1),
         f"--image-size {args.image_size} must be a positive multiple of the patch size {patch}"),
    ]:
        if bad:
            p.error(msg)


def get_args(argv=None):
    p = sample.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the run")
    g.add_argument("--out", default=None, help="run folder (default runs/<dataset> for selfe, runs/<dataset>-<method> otherwise)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    g.add_argument("--dataset", default="shapes", choices=["shapes", "cc3m", "folder"])
    g.add_argument("--data-dir", default=None, help="cc3m: img2dataset webdataset shards; folder: images + .txt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=200_000)
    g.add_argument("--max-minutes", type=float, default=None,
                   help="time budget; the LR decays over it (default 15 for shapes, none otherwise)")
    g.add_argument("--batch-size", type=int, default=64, help="per process, per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--workers", type=int, default=None, help="dataloader workers (default 0 on CPU, 4 on GPU)")
    g.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, else fp32 (on CUDA fp32 means TF32 matmuls); a resumed run keeps its own")
    g.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction, help="default on for CUDA")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--sample-every", type=int, default=500, help="sample grids at 1/2/4/8 steps (0: never)")
    g.add_argument("--ckpt-every", type=int, default=250)
    g = p.add_argument_group("the model and recipe")
    g.add_argument("--method", default="selfe", choices=["selfe", "flow", "meanflow"],
                   help="selfe (the paper), flow (flow matching), meanflow (the native few-step baseline)")
    g.add_argument("--model", default="tiny", choices=list(models.MODELS))
    g.add_argument("--dim", type=int, default=None, help="override the size's width")
    g.add_argument("--depth", type=int, default=None, help="override the size's number of blocks")
    g.add_argument("--heads", type=int, default=None, help="override the size's attention heads")
    g.add_argument("--patch", type=int, default=None, help="override the size's patch size")
    g.add_argument("--time-scale", type=float, default=None,
                   help="time features sin(scale * t) (default 1000 as DiT; 10 for meanflow, whose JVP "
                        "differentiates them in t)")
    g.add_argument("--image-size", type=int, default=None, help="default 32 for shapes, 64 otherwise")
    g.add_argument("--max-text-len", type=int, default=None, help="caption tokens (default 16 for shapes, 32 else)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (shapes needs ~100)")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="null-prompt rate, for CFG (ours: 10%%)")
    g.add_argument("--tau-anneal", type=float, default=0.4,
                   help="fraction of training over which tau goes 0 -> 1 (paper: 300k of 710k)")
    g.add_argument("--mu", type=float, default=None, help="time shift (default from the image token count)")
    g.add_argument("--meanflow-cfg", type=float, default=1.0,
                   help="meanflow: guidance omega folded into the target (MeanFlow Eq. 19; 1 = none)")
    g.add_argument("--meanflow-v-loss", action="store_true",
                   help="meanflow: improved MeanFlow's v-loss (iMF): du/dt along the network's own velocity u(z, t, t)")
    g.add_argument("--optimizer", default="muon", choices=["adam", "muon"],
                   help="muon: torch.optim.Muon on the blocks' 2-D weights (RMS matched to Adam's), Adam on the rest "
                        "(the recipe search's winner; paper: Adam)")
    g.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (search winner on tiny; paper 3e-4)")
    g.add_argument("--lr-min", type=float, default=1e-5)
    g.add_argument("--warmup", type=int, default=100, help="warm-up steps (paper: 1000)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay, warmed up as (1+n)/(10+n) (paper: 0.9999)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--omega", type=float, default=None,
                   help="guidance scale omega >= 0 stored for sampling (1: none, 0: unconditional; default: "
                        "sampler.DEFAULTS, 2.0 for flow, else 1.0)")
    g = p.add_argument_group("the paper's ablations")
    g.add_argument("--no-energy-preserving", action="store_true", help="plain Eq. 16 instead of Eq. 20")
    g.add_argument("--fake-start", type=float, default=None,
                   help="switch the fake-score term on at this fraction of training (paper: 0.775); off if unset")
    g.add_argument("--fake-k", type=float, default=0.9, help="k of Eq. s.6: the classifier share of Delta (paper 0.9)")
    g.add_argument("--evaluator", default="ema", choices=["ema", "live"],
                   help="weights of the conditional self-evaluation pass (paper S.2: the EMA's)")
    g.add_argument("--prediction", default="x", choices=["x", "v"],
                   help="the head predicts x0 (default; V = (x_t - x0)/t) or V directly (the paper's)")
    g = p.add_argument_group("research levers (ours, levers.py; off by default)")
    g.add_argument("--shortcut", type=float, default=0.0,
                   help="share of the jumps trained on the model's own two half jumps instead of self-evaluation")
    g.add_argument("--flow-target", type=float, default=0.0,
                   help="share of the jumps drawn at s = 0; they and the jumps at s <= --flow-below * t regress on "
                        "--flow-steps Euler steps of the EMA's own flow head")
    g.add_argument("--flow-steps", type=int, default=8, help="Euler steps of the flow target")
    g.add_argument("--flow-below", type=float, default=0.1, help="jumps with s <= this * t take the flow target too")
    g.add_argument("--flow-t", default="drawn", choices=["drawn", "one"],
                   help="the t of the jumps drawn at s = 0: as drawn, or 1 (the 1-step jump alone; the lab's best 1 step)")
    g = p.add_argument_group("benchmark protocol")
    g.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="what --max-minutes counts: wall-clock, or this process's CPU time (a run that shares "
                        "the CPU with other work then still gets the same compute)")
    g.add_argument("--snapshots", type=float, nargs="*", default=[],
                   help="also keep a copy of the checkpoint as ckpt_<M>min.pt when the budget clock passes M "
                        "minutes (learning curves)")
    g.add_argument("--snapshot-steps", type=int, nargs="*", default=[],
                   help="also keep a copy as ckpt_<N>steps.pt after optimiser step N (step-matched learning curves)")
    args = p.parse_args(argv)
    args.image_size = args.image_size if args.image_size is not None else (32 if args.dataset == "shapes" else 64)
    if args.time_scale is None and args.method == "meanflow":
        args.time_scale = 10.0
    overrides = {k: getattr(args, k) for k in ARCH if getattr(args, k) is not None}
    args.arch = {**models.MODELS[args.model], **overrides}  # the whole network, kept in the checkpoint's config
    check_args(p, args)
    argv = sys.argv[1:] if argv is None else argv
    args.given = sorted({a.dest for a in p._actions for x in argv if x.split("=")[0] in a.option_strings})
    if args.max_text_len is None:
        args.max_text_len = 16 if args.dataset == "shapes" else 32
    if args.max_minutes is None:
        args.max_minutes = 15.0 if args.dataset == "shapes" else 0.0
    args.out = args.out or f"runs/{args.dataset}" + ("" if args.method == "selfe" else f"-{args.method}")
    return args


# -----------------------------------------------------------------------------
# the pieces of a run, in the order main builds them

@dataclass
class Env:
    """Where this process runs: DDP or not, its rank among `world`, its device and autocast context."""
    ddp: bool
    rank: int
    world: int
    local: int
    device: str
    autocast: object = contextlib.nullcontext()  # set by device_defaults, once the run's own config is known

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.startswith("cuda")


def setup_distributed():
    """One process, or DDP when torchrun sets RANK (NCCL on GPUs, one per process; gloo on CPUs)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available()
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if cuda and local >= torch.cuda.device_count():
            raise SystemExit(f"error: local rank {local} but only {torch.cuda.device_count()} visible GPU(s): "
                             f"give torchrun --nproc_per_node at most the number of GPUs")
        if cuda:
            torch.cuda.set_device(local)
            # each rank's inductor compile workers: a share of the node's cores, not min(32, cpu_count) each
            os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS",
                                  str(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local) if cuda else None)
    else:
        rank, world, local = 0, 1, 0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return Env(ddp, rank, world, local, f"cuda:{local}" if cuda else "cpu")


def device_defaults(args, env):
    """Precision and compile: the run's own (a resumed run's config), else the device's defaults (bf16 and
    torch.compile on CUDA). Called after open_run, so that a resumed run never takes the device's. Sets
    env.autocast."""
    args.precision = args.precision or ("bf16" if env.cuda and torch.cuda.is_bf16_supported() else "fp32")
    args.compile = env.cuda if args.compile is None else args.compile
    env.autocast = (torch.autocast(env.device.split(":")[0], dtype=torch.bfloat16) if args.precision == "bf16"
                    else contextlib.nullcontext())


def open_run(args, env):
    """The run folder: resume its checkpoint (its own config, except what this command line sets among a few
    flags), or refuse to start over an existing one. Returns (args, checkpoint or None)."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"error: --out {args.out} is a file, not a run folder; choose another --out")
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"error: --resume but there is no {ckpt_path}; start a run without --resume")
        ckpt = models.load_checkpoint(ckpt_path)
        if "opt" not in ckpt:
            raise SystemExit(f"error: {ckpt_path} holds exported weights only (no optimiser state); it cannot be "
                             f"resumed")
        given = {k: getattr(args, k) for k in args.given if k in MAY_CHANGE}
        saved = ckpt["config"]
        stored = lambda k: saved.get("arch", {}).get(k, saved.get(k)) if k in ARCH else saved.get(k)
        clash = [k for k in args.given if k not in MAY_CHANGE | {"resume", "out"} and getattr(args, k) != stored(k)]
        if clash:
            flags = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {stored(k)})" for k in clash)
            raise SystemExit(f"error: {flags}: a resumed run keeps its own config; drop the flag, or start a new run "
                             f"with another --out (on resume only these may change: "
                             f"{', '.join('--' + k.replace('_', '-') for k in sorted(MAY_CHANGE))})")
        # the folder resumed is where the run now lives: a copied or moved run folder writes there, never to
        # the stored --out (which would overwrite the original run's checkpoint)
        args = argparse.Namespace(**{**vars(args), **ckpt["config"], **given, "out": args.out, "resume": True})
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue it or --out to start a new run")
    if env.master:
        os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
    return args, ckpt


def check_shared_out(args, env):
    """Under DDP every rank reads what rank 0 writes into --out (the tokenizer, ckpt.pt on resume), so --out must be
    one folder that every node sees. Rank 0 leaves a token there; a rank that cannot read it back stops every rank
    with one line (instead of one node failing while the others wait in a collective)."""
    if not env.ddp or os.path.isfile(args.out):  # a file: open_run says so on every rank
        return
    token = [f"{os.getpid()}-{time.time()}" if env.master else None]
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(args.out, ".rank0_token")
    if env.master:
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            f.write(token[0])
    dist.barrier()
    seen = shared_token_ok(path, token[0])
    ok = torch.tensor([float(seen)], device=env.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise SystemExit(f"error: --out {args.out} is not one folder seen by every rank (rank {env.rank} "
                         f"{'reads it' if seen else 'cannot read rank 0 files there'}): on several nodes, put --out "
                         f"on a shared filesystem")


def shared_token_ok(path, token):
    """True when `path` holds `token`: this process sees the file rank 0 just wrote."""
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def ignore_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which saves and stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_data(args, env, ckpt):
    """The tokenizer (the checkpoint's, or trained on the data's captions) and an endless batch iterator."""
    if ckpt is not None:
        tok = data.Tokenizer(ckpt["tokenizer"], args.max_text_len)
    elif args.dataset == "shapes":
        tok = data.Tokenizer(data.train_tokenizer(data.shapes_captions(), args.vocab_size).json, args.max_text_len)
    else:
        tok = data.tokenizer_for(args.dataset, args.data_dir, args.vocab_size, args.max_text_len, args.out,
                                 env.ddp, env.master)
    start = ckpt["step"] if ckpt else 0
    if args.dataset == "shapes":  # batch b is a pure function of (seed, b): resume continues the same stream
        dataset = data.ShapesStream(args.seed + 1000 * env.rank, args.batch_size, args.image_size,
                                    start=start * args.grad_accum)
    else:  # shards: a resumed run starts a fresh shuffle of the data (seeded by the step)
        dataset = data.ImageTextStream(args.dataset, args.data_dir, args.batch_size, args.image_size,
                                       env.rank, env.world, seed=args.seed + start)
    workers = args.workers if args.workers is not None else (4 if env.cuda else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         pin_memory=env.cuda, persistent_workers=workers > 0,
                                         worker_init_fn=ignore_signals)
    return tok, iter(loader)


def lr_at(step, progress, args):
    """Linear warm-up, then linear decay lr -> lr_min over training (paper S.2)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr + (args.lr_min - args.lr) * min(1.0, progress)


def newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's orthogonalisation (its quintic Newton-Schulz iteration, same coefficients and steps), in
    fp32 instead of bf16. A CPU without bf16 matrix units (AVX2 only) runs bf16 matmuls ~40x slower than fp32: in
    torch 2.13 they took 1.8 s of a 1.9 s tiny-model step at batch 4 on such a machine; a batch-64 step took 2.58 s
    with them and 0.72 s with this (LOG.md, 2026-12-06). The result differs from the bf16 one by a few bf16
    roundings (measured: at most 0.006 on entries of ~0.3)."""
    a, b, c = ns_coefficients
    X = grad.float().T if grad.size(0) > grad.size(1) else grad.float()
    X = X / X.norm().clamp(min=eps)                                     # spectral norm at most 1
    for _ in range(ns_steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)   # a X + (b A + c A^2) X
    return (X.T if grad.size(0) > grad.size(1) else X).to(grad.dtype)


def make_optimizers(model, args, cuda=False):
    """Adam (paper S.2: betas 0.9, 0.95) on everything; or Muon on the transformer blocks' 2-D weights and
    Adam on the rest (embeddings, biases, norms, time MLPs, input and output layers). On a CPU without bf16
    matmuls, Muon's Newton-Schulz runs in fp32 (newton_schulz_fp32)."""
    if not cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_fp32
    hidden = [p for name, p in model.named_parameters() if p.ndim == 2 and ".blocks." in f".{name}"]
    ids = {id(p) for p in hidden} if args.optimizer == "muon" else set()
    rest = [p for p in model.parameters() if id(p) not in ids]
    opts = [torch.optim.Adam(rest, lr=args.lr, betas=(0.9, 0.95), fused=cuda)]
    if ids:
        opts.append(torch.optim.Muon(hidden, lr=args.lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"))
    return opts


def rank_stream(seed, rank, ckpt=None):
    """This rank's random stream (caption dropout, times, noise): seeded by seed + rank, or restored from the
    checkpoint. A rank the checkpoint has no stream for (resumed on more processes) gets a stream of its own,
    seeded by (seed, rank, step), never a copy of another rank's."""
    gen = torch.Generator()
    if ckpt is None:
        return gen.manual_seed(seed + rank)
    if rank < len(ckpt["rng"]):
        gen.set_state(ckpt["rng"][rank])
        return gen
    return gen.manual_seed(hash((seed, rank, ckpt["step"])) % 2 ** 63)


def make_model(args, env, tok, ckpt):
    """The network (the plain module: checkpoints, the JVP), its EMA, the optimisers and this rank's random stream
    (rank_stream), restored from the checkpoint if any."""
    torch.manual_seed(args.seed)
    model = models.build(args.model, tok.vocab_size, args.max_text_len, args.image_size, args.prediction,
                         **models.config_arch(vars(args))).to(env.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opts = make_optimizers(model, args, env.cuda)
    gen = rank_stream(args.seed, env.rank, ckpt)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        for o, state in zip(opts, ckpt["opt"] if isinstance(ckpt["opt"], list) else [ckpt["opt"]]):
            o.load_state_dict(state)
    return model, ema, opts, gen


def make_method(args, env, tok, model, ema, gen):
    """The method object (losses.FlowMatching, losses.SelfE, levers.Levers or losses.MeanFlow) and `net`, the
    module that takes the pass with gradient (compiled and/or DDP-wrapped). The no-grad passes run on compiled
    copies of the model and the EMA; MeanFlow's JVP on the plain model (torch.func cannot go through either).
    Under DDP the DDP-wrapped module is compiled (as the PyTorch docs do), so the all-reduce overlaps the backward."""
    mu = losses.time_shift(vars(args), model.grid)
    fast = torch.compile(model) if args.compile else model
    net = fast
    if env.ddp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local] if env.cuda else None)
        net = torch.compile(net) if args.compile else net
    if args.method == "flow":
        return losses.FlowMatching(tok, mu, args.caption_dropout, gen, env.device), net
    if args.method == "meanflow":
        return losses.MeanFlow(tok, mu, model, args.caption_dropout, args.meanflow_cfg, v_loss=args.meanflow_v_loss,
                               generator=gen, device=env.device), net
    evaluator = (torch.compile(ema) if args.compile else ema) if args.evaluator == "ema" else fast
    paper = dict(caption_dropout=args.caption_dropout, tau_anneal=args.tau_anneal,
                 energy_preserving=not args.no_energy_preserving, fake_start=args.fake_start, k=args.fake_k,
                 generator=gen, device=env.device)
    if args.shortcut or args.flow_target:  # ours: the paper's method plus the levers
        return levers.Levers(tok, mu, evaluator, fast, shortcut=args.shortcut, flow_target=args.flow_target,
                             flow_steps=args.flow_steps, flow_below=args.flow_below, flow_t=args.flow_t, **paper), net
    return losses.SelfE(tok, mu, evaluator, fast, **paper), net


def announce(args, env, model, tok):
    """Say what is being trained, and write the run's config.json and tokenizer.json."""
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.method} | model {args.model}: {n_params / 1e6:.2f}M params | {args.dataset} {args.image_size}px"
          f" | device {env.device} x{env.world} | {args.precision} | compile {args.compile} | out {args.out}")
    if args.max_minutes:
        print(f"training for {args.max_minutes:g} {'CPU-' if args.clock == 'cpu' else ''}minutes "
              f"(or {args.max_steps} steps); README's 'Two commands' says what to expect")


def micro_step(method, net, x0, captions, progress, *, accum, sync, autocast):
    """One of `accum` micro-batches of an optimiser step: backward of loss / accum, so that the gradients add up to
    that of the mean loss. sync: False under DDP before the last micro-batch (no all-reduce yet: no_sync)."""
    with (contextlib.nullcontext() if sync else net.no_sync()), autocast:
        loss, parts = method.loss(net, x0, captions, progress)
        (loss / accum).backward()
    return loss, parts


def gather(env, obj):
    """[obj of rank 0, obj of rank 1, ...] under DDP (every rank must call it), [obj] in one process."""
    if not env.ddp:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def write_grid(args, env, ema, tok, step, prompts):
    """EMA samples of a few prompts at 1, 2, 4, 8 steps: <out>/grids/stepNNNNNNN.png."""
    sample.write_grid(ema, tok, vars(args), prompts, [1, 2, 4, 8],
                      os.path.join(args.out, "grids", f"step{step:07d}.png"), device=env.device)


class StopRequest:
    """SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask the loop to stop after the current step and save.
    A repeated SIGTERM never stops at once: schedulers send it to every process of a job, and torchrun forwards
    its own, so two arrive a moment apart; the save must still happen. A second Ctrl-C at least `patience`
    seconds after the first stops at once (a person at a terminal; the last checkpoint stays as it is)."""

    def __init__(self, patience=2.0):
        self.signal, self.at, self.patience = None, None, patience
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self.at = name, time.monotonic()
        elif name == "SIGINT" and time.monotonic() - self.at >= self.patience:
            raise SystemExit("stopped by a second SIGINT; not saved (the last checkpoint stays as it is)")


class Log:
    """Every --log-every steps: loss parts (averaged across ranks) to <out>/log.jsonl and the progress bar.
    A time-budgeted run's bar estimates its total steps from the measured rate, so it shows an ETA."""

    def __init__(self, args, env, step):
        self.args, self.env = args, env
        self.bar = tqdm(total=args.max_steps, initial=step, disable=not env.master, dynamic_ncols=True, unit="step")
        self.file = open(os.path.join(args.out, "log.jsonl"), "a") if env.master else None
        self.t, self.images = time.time(), 0

    def step(self, step, loss, parts, lr, grad_norm, elapsed, skipped):
        args, env = self.args, self.env
        self.images += args.batch_size * args.grad_accum * env.world
        self.bar.update(1)
        if step % args.log_every and step != args.max_steps:
            return
        keys = sorted(parts)  # the parts stay on the device until here: one host sync per logging step
        vals = torch.stack([torch.as_tensor(parts[k], dtype=torch.float32, device=env.device).reshape(())
                            for k in keys] + [loss.detach().float()])
        if env.ddp:  # logged numbers are averaged across ranks
            dist.all_reduce(vals, op=dist.ReduceOp.AVG)
        rate = self.images / (time.time() - self.t)
        self.t, self.images = time.time(), 0
        if not env.master:
            return
        rec = dict(step=step, loss=vals[-1].item(), **{k: round(v, 5) for k, v in zip(keys, vals.tolist())},
                   lr=lr, grad_norm=round(grad_norm.item(), 4), img_per_s=round(rate, 1),
                   minutes=round(elapsed / 60, 2), skipped=skipped)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if args.max_minutes and elapsed > 0:  # steps this budget will reach at the measured rate: an ETA
            self.bar.total = min(args.max_steps, max(step, round(step / elapsed * args.max_minutes * 60)))
        self.bar.set_postfix({"loss": f"{rec['loss']:.4f}", "data": f"{rec['data']:.4f}",
                              "self": f"{rec['self']:.4f}", "img/s": f"{rate:.0f}",
                              "min": f"{elapsed / 60:.1f}" + (f"/{args.max_minutes:g}" if args.max_minutes else "")})

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


# -----------------------------------------------------------------------------
# main: the setup, then one loop

def main(argv=None):
    args = get_args(argv)
    if args.dataset != "shapes":  # no data, or no usable sample in it: one line before the run folder is made
        data.list_sources(args.dataset, args.data_dir)
        data.check_source(args.dataset, args.data_dir, args.image_size)
    env = setup_distributed()
    check_shared_out(args, env)
    args, ckpt = open_run(args, env)
    device_defaults(args, env)
    tok, loader = make_data(args, env, ckpt)
    model, ema, opts, gen = make_model(args, env, tok, ckpt)
    method, net = make_method(args, env, tok, model, ema, gen)
    if ckpt is not None:  # the method's own state (Self-E's fake-score riders), one per rank
        states = ckpt.get("method") or [{}]
        method.load_state_dict(states[env.rank] if env.rank < len(states) else {})
    if env.master:
        announce(args, env, model, tok)

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step = first = last_saved = ckpt["step"] if ckpt else 0
    clock = time.process_time if args.clock == "cpu" else time.time
    before = ckpt["elapsed"] if ckpt else 0.0     # the budget clock at the last check
    t_start, t_wall = clock() - before, time.time()
    budget = args.max_minutes * 60
    stop, skipped, log = StopRequest(), {}, Log(args, env, step)
    prompts = sample.DEFAULT_PROMPTS[:6] if args.dataset == "shapes" else None  # else the first batch's captions
    while True:
        # ---- the clock, a stop request, and the checkpoints due after the last step ----
        elapsed, stop_now = clock() - t_start, stop.signal is not None
        if env.ddp:  # every rank must agree on the time (LR, stopping, snapshots) and on a stop request
            e = torch.tensor([elapsed, float(stop_now)], device=env.device)
            dist.all_reduce(e, op=dist.ReduceOp.MAX)
            elapsed, stop_now = e[0].item(), bool(e[1].item())
        done = stop_now or step >= args.max_steps or bool(budget and elapsed >= budget)
        due = [models.snapshot_name(minutes=m) for m in args.snapshots if before < m * 60 <= elapsed]
        if step > first and step in args.snapshot_steps:
            due.append(models.snapshot_name(step=step))
        if done or (step > first and step % args.ckpt_every == 0):
            due.append("ckpt.pt")
        before = elapsed
        if due:
            rngs, states = gather(env, gen.get_state()), gather(env, method.state_dict())
            for name in due if env.master else []:
                models.save_checkpoint(os.path.join(args.out, name), model=model.state_dict(), ema=ema.state_dict(),
                                       opt=[o.state_dict() for o in opts], step=step, elapsed=elapsed, rng=rngs,
                                       method=states, config=vars(args), tokenizer=tok.json)
            last_saved = step if "ckpt.pt" in due else last_saved
        if done:
            break

        # ---- one optimiser step: batch, loss, backward (micro-steps), clip, step, EMA ----
        progress = max(step / args.max_steps, elapsed / budget if budget else 0.0)
        lr = lr_at(step, progress, args)
        for group in (g for o in opts for g in o.param_groups):
            group["lr"] = lr
        parts = {}
        for micro in range(args.grad_accum):
            x0, captions, bad = next(loader)                                         # (B, 3, H, W), B strings
            prompts = prompts or list(captions[:6])
            for k, v in bad.items():                                                 # broken samples, counted
                skipped[k] = skipped.get(k, 0) + v
            loss, p = micro_step(method, net, x0.to(env.device, non_blocking=True), captions, progress,
                                 accum=args.grad_accum, sync=not env.ddp or micro == args.grad_accum - 1,
                                 autocast=env.autocast)
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if not torch.isfinite(grad_norm):  # never step (or save) on NaN/inf: the last checkpoint stays good
            kept = f"the last good checkpoint is {ckpt_path} (step {last_saved})" if last_saved else "none was saved"
            raise SystemExit(f"error: non-finite loss or gradient at step {step + 1} (loss {loss.item():.4g}); "
                             f"stopped without saving: {kept}. A lower --lr or --clip may help")
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        models.ema_update(ema, model, args.ema, step)
        step += 1

        # ---- what the user sees: the first step's time, the log, sample grids ----
        if env.master and step == first + 1:  # the first step pays for torch.compile's graph capture
            print(f"first step: {time.time() - t_wall:.1f} s wall" + (" (includes torch.compile)" if args.compile else ""))
        log.step(step, loss, parts, lr, grad_norm, elapsed, skipped)
        if env.master and args.sample_every and step % args.sample_every == 0:
            write_grid(args, env, ema, tok, step, prompts)

    log.close()
    if env.master:
        write_grid(args, env, ema, tok, step, prompts or sample.DEFAULT_PROMPTS[:6])
        print(f"stopped by {stop.signal} at step {step}; checkpoint {ckpt_path}. Continue with: python train.py "
              f"--out {args.out} --resume" if stop.signal else f"done: {step} steps in {elapsed / 60:.1f} min; "
              f"checkpoint {ckpt_path}; try: python sample.py --ckpt {ckpt_path} --steps 1 2 4 8")
        if env.cuda:
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated(env.device) / 2**30:.2f} GiB allocated")
    if env.ddp:
        dist.barrier()  # leave together: a rank that tears down while rank 0 still writes can abort (gloo)
        dist.destroy_process_group()
    if stop.signal:  # saved, but not finished: exit 128 + signal number, so a driver (benchmark.py) resumes it
        raise SystemExit(128 + signal.Signals[stop.signal].value)


if __name__ == "__main__":
    main()
