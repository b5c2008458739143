"""Why do Self-E's few-step samples stall? Measure what the jumping half of a batch learns from, per time t.

    python diagnose.py --ckpt runs/shapes/ckpt.pt          # a Self-E run's checkpoint (live and EMA weights)

On a fixed batch of shapes images, for each t (and a jump to s = t / 2, the middle of U(0, t)), it reports:
  data      ||G(x_t, t, t, c) - x0||^2 (no jump) and ||G(x_t, t, s, c) - x0||^2 (the jump), per pixel
  lambda    lambda_{s,t} (Eq. 17) and 1 / (1 + lambda): the share of the data x0 in the target y = x0 + lambda x_self
  pulls     the two parts of the energy-preserving target's pull on x0_hat (Eq. 20), before the renorm:
            data (x0 - x0_hat) / (1 + lambda) and self -lambda Delta / (1 + lambda), as RMS per pixel
  Delta     the self-evaluation direction G_phi(live) - G_c(EMA) at the re-noised landing point (Eq. 14), split
            into the classifier part of one set of weights, G_phi - G_c, and the lag between live and EMA
            weights, G_phi(live) - G_phi(EMA); cos = cosine between Delta and the EMA's classifier part.
Writes <ckpt folder>/diagnose.json.
"""
import argparse
import json
import os

import torch

import data
import losses
import model as models
from model import G

TIMES = [0.2, 0.4, 0.6, 0.8, 0.95, 0.999]


def rms(x):
    return x.pow(2).flatten(1).mean(1).sqrt().mean().item()


@torch.no_grad()
def diagnose(ckpt, n=256, seed=99):
    cfg = ckpt["config"]
    tok = data.Tokenizer(ckpt["tokenizer"], cfg["max_text_len"])
    live = models.from_checkpoint(ckpt, tok.vocab_size, "model")
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    args = p.parse_args()
    ckpt = models.load_checkpoint(args.ckpt)
    if ckpt["config"].get("dataset") != "shapes":
        p.error("diagnose.py measures on shapes images: give a checkpoint trained with --dataset shapes")
    rows = diagnose(ckpt)
    cols = list(next(iter(rows.values())))
    print("| t | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for t, r in rows.items():
        print(f"| {t} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "diagnose.json")
    json.dump(dict(step=ckpt["step"], rows=rows), open(out, "w"), indent=1)
    print(f"step {ckpt['step']}; wrote {out}")


if __name__ == "__main__":
    main()
