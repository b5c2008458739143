"""Why do Self-E's few-step samples stall? Three studies of one checkpoint.

    python -m scripts.diagnose --ckpt runs/shapes/ckpt.pt              # what the jumps learn from, per time t
    python -m scripts.diagnose --ckpt runs/shapes/ckpt.pt --fewstep    # where the 1- and 2-step samples go wrong
    python -m scripts.diagnose --ckpt runs/shapes/ckpt.pt --jvp        # MeanFlow's JVP terms, one by one
    python -m scripts.diagnose --ckpt runs/shapes/ckpt.pt --lastjump   # a CPU-minute: has the last jump learned?

Exported weights (checkpoints/shapes_tiny_selfe.pt) hold the EMA only: the first study then uses the EMA for
the live weights too, so its lag between live and EMA weights reads 0 (it says so).

The first study:

On a fixed batch of shapes images, for each t (and a jump to s = t / 2, the middle of U(0, t)), it reports:
  data      ||G(x_t, t, t, c) - x0||^2 (no jump) and ||G(x_t, t, s, c) - x0||^2 (the jump), per pixel
  lambda    lambda_{s,t} (Eq. 17) and 1 / (1 + lambda): the share of the data x0 in the target y = x0 + lambda x_self
  pulls     the two parts of the energy-preserving target's pull on x0_hat (Eq. 20), before the renorm:
            data (x0 - x0_hat) / (1 + lambda) and self -lambda Delta / (1 + lambda), as RMS per pixel
  Delta     the self-evaluation direction G_phi(live) - G_c(EMA) at the re-noised landing point (Eq. 14), split
            into the classifier part of one set of weights, G_phi - G_c, and the lag between live and EMA
            weights, G_phi(live) - G_phi(EMA); cos = cosine between Delta and the EMA's classifier part.
Writes <out>/diagnose.json (default: the checkpoint's run folder; eval/shipped for the shipped weights).

--fewstep (ShapesEval on the evaluation prompts, per task; writes <out>/fewstep.json):
  s_sweep    1-step scores with the sampler's s in 0 ... 1 (paper Fig. S.4: s = 0.5 at one step)
  two_step   the 2-step sample, against its first jump finished by 50 flow-matching-style steps (s_k = t_k,
             eta 0) of the same model: if that finish scores as low, the composition was lost in the first jump
  one_step   on 10 prompts per task x 8 noises: the per-pixel distance of the 1-step sample from the prompt's
             conditional mean E[x0 | c] (256 ground-truth renders averaged) and from the nearest of those
             renders, and how much the sample moves with the input noise (std over the 8 noises), against
             the data's own spread around E[x0 | c]; the same for 50 steps, and for s = 0.5 and s = 1.

--lastjump (about a CPU-minute; writes <out>/lastjump.json): the probe of the 2-step sampler's last jump, to s = 0.
  On 256 shapes images noised to its t_1: last_vs_flow, the RMS of G(x_t1, t1, 0, c) against the model's own
  flow prediction G(x_t1, t1, t1, c) ~ E[x0 | x_t1, c], and posterior_spread, the RMS of the data around that
  mean; their ratio left_the_mean is ~0 when the jump has learned the posterior mean (the paper's Self-E: Delta = 0
  at s = 0) and ~1 for a jump that lands on samples spread like the posterior's. teacher_vs_flow and
  last_vs_teacher: where 8 Euler steps of the flow head land from x_t1 (the --flow-target lever's target for this
  jump), against the flow prediction and against the jump: has the jump learned its target? Then ShapesEval overall (10
  prompts per task) of the 2-step sample and of its first jump finished by K = 2 and 4 steps of the flow head.
  s_sweep: the same for the jumps t_1 -> s, s / t_1 in S_FRACS: where each lands (x_s) against the ODE's landing
  (K Euler steps of the flow head) and the flow head's one Euler step; learned = 1 - jump_vs_ode / ode_vs_euler,
  the share of the way from the one-step Euler landing to the ODE's that the jump has learned; cond_vs_last, how far
  the conditioning c = MLP_t(t) + MLP_s(t - s) + text moves from the last jump's (s = 0), relative to its norm
  (cond_flow_vs_last: the flow head's, s = t).
"""
import argparse
import json
import os

import torch

import data
import evaluate
import levers
import losses
import model as models
import sample
import sampler
from model import G

TIMES = [0.2, 0.4, 0.6, 0.8, 0.95, 0.999]
S_FRACS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]  # --lastjump's sweep of s / t_1 (--flow-below is 0.1 as shipped)


def rms(x):
    return x.pow(2).flatten(1).mean(1).sqrt().mean().item()


@torch.no_grad()
def diagnose(ckpt, n=256, seed=99):
    cfg = ckpt["config"]
    tok = data.Tokenizer(ckpt["tokenizer"], cfg["max_text_len"])
    live = models.from_checkpoint(ckpt, tok.vocab_size, "model" if "model" in ckpt else "ema")
    ema = models.from_checkpoint(ckpt, tok.vocab_size, "ema")
    x0, captions = data.shapes_batch(seed, 0, n, cfg["image_size"])
    ids, null = tok(captions), tok([""]).expand(n, -1)
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for t_ in TIMES:
        t, s = torch.full((n,), t_), torch.full((n,), t_ / 2)
        x_t = losses.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        flow = G(live, x_t, t, t, ids)                    # no jump: s = t
        jump = G(live, x_t, t, s, ids)                    # x0_hat of the jump t -> s
        x_s = losses.add_noise(jump, torch.randn(x0.shape, generator=g), s)
        G_c_ema, G_phi_live = G(ema, x_s, s, s, ids), G(live, x_s, s, s, null)
        G_phi_ema, G_c_live = G(ema, x_s, s, s, null), G(live, x_s, s, s, ids)
        delta = G_phi_live - G_c_ema                                      # what training uses (Eq. 14)
        cls = G_phi_ema - G_c_ema                                         # the classifier part, EMA weights
        lam = losses.lambda_st(s, t)[0].item()
        cos = torch.nn.functional.cosine_similarity(delta.flatten(1), cls.flatten(1)).mean().item()
        rows[str(t_)] = dict(
            data_no_jump=losses.per_sample_mse(flow, x0).mean().item(),
            data_jump=losses.per_sample_mse(jump, x0).mean().item(),
            lam=lam, data_share=1 / (1 + lam),
            pull_data=rms((x0 - jump) / (1 + lam)), pull_self=rms(lam * delta / (1 + lam)),
            delta=rms(delta), classifier_ema=rms(cls), classifier_live=rms(G_phi_live - G_c_live),
            lag=rms(G_phi_live - G_phi_ema), cos_delta_classifier=cos)
    return rows


def first_jump_then(net, tok, cfg, K):
    """generate(prompts, steps, generator=None) for evaluate.evaluate: the 2-step sampler's first step (to t_1), then
    K deterministic steps of the model's own flow head (s_k = t_k, eta 0) from t_1 to 0; `steps` is ignored."""
    mu = losses.time_shift(cfg, net.grid)
    opts, shape = sample.sampling_defaults(cfg), (3, cfg["image_size"], cfg["image_size"])
    t1 = sampler.schedule(2, mu)[1].item()

    @torch.no_grad()
    def generate(prompts, steps, generator=None):
        ids = tok(prompts)
        x = sampler.sample(net, ids, tok([""]), 1, mu, shape, ts=[1.0, t1], generator=generator, **opts)  # x_{t_1}
        return sampler.sample(net, ids, tok([""]), K, mu, shape, omega=opts["omega"], eta=0.0, s_mode="same",
                              x=x, ts=torch.linspace(t1, 0, K + 1).tolist())
    return generate


@torch.no_grad()
def lastjump(ckpt, per_task=10, n=4, K=(2, 4), seed=0, batch=256):
    """Has the last jump left the posterior mean? (about a CPU-minute; see the docstring's --lastjump)"""
    cfg = ckpt["config"]
    tok = data.Tokenizer(ckpt["tokenizer"], cfg["max_text_len"])
    net = models.from_checkpoint(ckpt, tok.vocab_size)
    t1 = sampler.schedule(2, losses.time_shift(cfg, net.grid))[1].item()
    x0, captions = data.shapes_batch(seed + 99, 0, batch, cfg["image_size"])
    t = torch.full((batch,), t1)
    x_t = losses.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)), t)
    ids = tok(captions)
    flow, last = G(net, x_t, t, t, ids), G(net, x_t, t, torch.zeros(batch), ids)   # s = t: E[x0 | x_t, c]
    out = dict(t1=t1, last_vs_flow=rms(last - flow), posterior_spread=rms(x0 - flow), last_vs_data=rms(last - x0))
    out["left_the_mean"] = out["last_vs_flow"] / out["posterior_spread"]
    # the --flow-target lever's target for this jump: where the run's --flow-steps (8) Euler steps of the flow head land
    teacher = x_t - losses.bcast(t) * levers.flow_target(net, x_t, t, torch.zeros(batch), ids, cfg.get("flow_steps", 8))
    out.update(teacher_vs_flow=rms(teacher - flow), last_vs_teacher=rms(last - teacher))
    out["s_sweep"] = {}  # the jumps t_1 -> s beside the last one: what each lands on, as a share of the way
    pooled = net.text(ids)[2]                                     # the text once; c for each s below
    cond = lambda s: net.condition(t, s, pooled)                  # what the DiT's adaLN reads (B, D)
    c0 = cond(torch.zeros(batch))
    out["cond_flow_vs_last"] = ((cond(t) - c0).norm(dim=1) / c0.norm(dim=1)).mean().item()   # s = t against s = 0
    for frac in S_FRACS:  # from the flow head's one Euler step (0) to the flow target's K steps (1)
        s = torch.full((batch,), frac * t1)
        euler, jump = (x_t - losses.bcast(t - s) * net(x_t, t, q, ids) for q in (t, s))
        ode = x_t - losses.bcast(t - s) * levers.flow_target(net, x_t, t, s, ids, cfg.get("flow_steps", 8))
        out["s_sweep"][str(frac)] = dict(ode_vs_euler=rms(ode - euler), jump_vs_ode=rms(jump - ode),
                                         learned=1 - rms(jump - ode) / rms(ode - euler),
                                         cond_vs_last=((cond(s) - c0).norm(dim=1) / c0.norm(dim=1)).mean().item())
    gen = sample.make_generate(net, tok, cfg)
    score = lambda g: evaluate.evaluate(g, [2], per_task, n, seed=seed, swd=False)["2"]["overall"]
    out["two_steps"] = score(gen)
    out["first_jump_then"] = {str(k): score(first_jump_then(net, tok, cfg, k)) for k in K}
    return out


@torch.no_grad()
def fewstep(ckpt, per_task=50, n=4, seed=0):
    """Where the few-step samples go wrong (see the docstring): dict(s_sweep, two_step, one_step)."""
    cfg = ckpt["config"]
    tok = data.Tokenizer(ckpt["tokenizer"], cfg["max_text_len"])
    net = models.from_checkpoint(ckpt, tok.vocab_size)
    opts = sample.sampling_defaults(cfg)
    shape = (3, cfg["image_size"], cfg["image_size"])
    out = dict(sampler=opts)

    gen = lambda **o: sample.make_generate(net, tok, cfg, **o)
    out["s_sweep"] = {str(a): evaluate.evaluate(gen(s_mode=a), [1], per_task, n, seed=seed)["1"]
                      for a in (0.0, 0.25, 0.5, 0.75, 1.0)}

    out["two_step"] = dict(two_steps=evaluate.evaluate(gen(), [2], per_task, n, seed=seed)["2"],
                           first_jump_then_50=evaluate.evaluate(first_jump_then(net, tok, cfg, 50), [2], per_task, n,
                                                                seed=seed)["2"])

    # the 1-step sample against the conditional mean and the data, 10 prompts per task, 8 noises each
    prompts = evaluate.eval_prompts(10)
    K, R = 8, 256
    refs = torch.from_numpy(evaluate.reference_images(prompts, R, cfg["image_size"])).float() / 127.5 - 1
    refs = refs.permute(0, 3, 1, 2).reshape(len(prompts), R, *shape)                 # (P, R, C, H, W)
    mean = refs.mean(1)                                                             # E[x0 | c]: (P, C, H, W)
    data_spread = (refs - mean[:, None]).pow(2).mean().sqrt().item()
    captions = [c for c, _ in prompts for _ in range(K)]
    rows = {}
    for name, steps, s_mode in (("1 step", 1, opts["s_mode"]), ("1 step, s = 0.5", 1, 0.5),
                                ("1 step, s = 1", 1, 1.0), ("50 steps", 50, opts["s_mode"])):
        torch.manual_seed(seed)
        x = gen(s_mode=s_mode)(captions, steps).clamp(-1, 1).view(len(prompts), K, *shape)
        nearest = torch.stack([torch.cdist(x[p].flatten(1), refs[p].flatten(1)).min(1).values
                               for p in range(len(prompts))]).pow(2) / x[0, 0].numel()
        rows[name] = dict(to_mean=(x - mean[:, None]).pow(2).mean().sqrt().item(),
                          to_nearest_render=nearest.mean().sqrt().item(),
                          noise_std=x.std(1).mean().item())
    out["one_step"] = dict(data_spread=data_spread, data_noise_std=refs.std(1).mean().item(), rows=rows)
    return out


def jvp_terms(ckpt, n=64, seed=99):
    """MeanFlow's du/dt = v d_z u + d_t u (its Eq. 8) at u = V(x_t, t, r = 0, c), the one-step jump, term by term:
    RMS per pixel of u, v = eps - x0, v d_z u and d_t u, per t. d_t u runs through the time features
    sin(time_scale * t): it is what a large scale inflates (train.py --time-scale)."""
    cfg = ckpt["config"]
    tok = data.Tokenizer(ckpt["tokenizer"], cfg["max_text_len"])
    net = models.from_checkpoint(ckpt, tok.vocab_size)
    x0, captions = data.shapes_batch(seed, 0, n, cfg["image_size"])
    ids, g = tok(captions), torch.Generator().manual_seed(seed)
    r_ = lambda x: x.pow(2).mean().sqrt().item()
    rows = {}
    for t_ in TIMES:
        t, r = torch.full((n,), t_), torch.zeros(n)
        eps = torch.randn(x0.shape, generator=g)
        x_t, v = losses.add_noise(x0, eps, t), eps - x0
        with torch.no_grad(), losses.sdpa_kernel(losses.SDPBackend.MATH):
            u, dz = torch.func.jvp(lambda z: net(z, t, r, ids), (x_t,), (v,))
            _, dt = torch.func.jvp(lambda tt: net(x_t, tt, r, ids), (t,), (torch.ones_like(t),))
        rows[str(t_)] = dict(u=r_(u), v=r_(v), v_dz_u=r_(dz), dt_u=r_(dt), target_minus_v=r_(t_ * (dz + dt)))
    return dict(time_scale=net.t_embed.scale, method=cfg["method"], step=ckpt["step"], rows=rows)


def print_fewstep(res):
    tasks = list(data.TASKS) + ["overall"]
    print("1 step, sampler's s | " + " | ".join(tasks))
    for a, r in res["s_sweep"].items():
        print(f"s = {a} | " + " | ".join(f"{r[k]:.3f}" for k in tasks))
    print("2 steps | " + " | ".join(tasks))
    for name, r in res["two_step"].items():
        print(f"{name} | " + " | ".join(f"{r[k]:.3f}" for k in tasks))
    o = res["one_step"]
    print(f"data: RMS spread around E[x0|c] {o['data_spread']:.3f}, std over renders {o['data_noise_std']:.3f}")
    for name, r in o["rows"].items():
        print(f"{name}: RMS to E[x0|c] {r['to_mean']:.3f}, to the nearest render {r['to_nearest_render']:.3f}, "
              f"std over noises {r['noise_std']:.3f}")


def main(argv=None):
    p = sample.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--fewstep", action="store_true", help="the few-step study instead (see above)")
    p.add_argument("--jvp", action="store_true", help="instead: MeanFlow's JVP terms at this checkpoint (jvp_terms)")
    p.add_argument("--lastjump", action="store_true", help="instead: the last-jump probe (see above)")
    p.add_argument("--per-task", type=int, default=None,
                   help="ShapesEval prompts per task (default: 50 for --fewstep, 10 for --lastjump)")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's run folder; eval/shipped for "
                                               "the shipped weights)")
    args = p.parse_args(argv)
    ckpt = models.load_checkpoint(args.ckpt)
    if ckpt["config"].get("dataset") != "shapes":
        p.error("diagnose.py measures on shapes images: give a checkpoint trained with --dataset shapes")
    out_dir = sample.output_folder(args.ckpt, args.out)
    os.makedirs(out_dir, exist_ok=True)
    if args.jvp:
        res = jvp_terms(ckpt)
        print(f"{res['method']}, time features sin({res['time_scale']:g} t), step {res['step']}: RMS per pixel at r = 0")
        for t, row in res["rows"].items():
            print(f"t = {t}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
        json.dump(res, open(os.path.join(out_dir, "jvp_terms.json"), "w"), indent=1)
        return
    if args.lastjump:
        res = lastjump(ckpt, args.per_task or 10)
        print(f"t_1 = {res['t1']:.3f}: last jump vs flow head RMS {res['last_vs_flow']:.4f}, posterior spread "
              f"{res['posterior_spread']:.4f} (ratio {res['left_the_mean']:.2f}); 2 steps {res['two_steps']:.3f}, "
              f"first jump + K flow steps: " + ", ".join(f"K={k} {v:.3f}" for k, v in res["first_jump_then"].items()))
        print("s / t_1:  " + "  ".join(f"{f} learned {r['learned']:.2f} (c moves {r['cond_vs_last']:.3f})"
                                     for f, r in res["s_sweep"].items()))
        json.dump(dict(ckpt=args.ckpt, step=ckpt["step"], **res), open(os.path.join(out_dir, "lastjump.json"), "w"),
                  indent=1)
        return
    if args.fewstep:
        res = fewstep(ckpt, args.per_task or 50)
        print_fewstep(res)
        out = os.path.join(out_dir, "fewstep.json")
        json.dump(dict(ckpt=args.ckpt, step=ckpt["step"], **res), open(out, "w"), indent=1)
        print(f"step {ckpt['step']}; wrote {out}")
        return
    if "model" not in ckpt:
        print(f"{args.ckpt} holds the EMA weights only: the live weights are taken to be the EMA, so lag reads 0")
    rows = diagnose(ckpt)
    cols = list(next(iter(rows.values())))
    print("| t | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for t, r in rows.items():
        print(f"| {t} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    out = os.path.join(out_dir, "diagnose.json")
    json.dump(dict(step=ckpt["step"], rows=rows), open(out, "w"), indent=1)
    print(f"step {ckpt['step']}; wrote {out}")


if __name__ == "__main__":
    main()
