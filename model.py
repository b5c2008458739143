"""A small text-conditioned DiT in pixel space, with Self-E's two time inputs (t and s).

Time convention (one for the whole project, see losses.py): x_t = (1 - t) x0 + t eps; t = 0 is data,
t = 1 is noise. The network takes the current time t and a target time s <= t and outputs a velocity V;
G(x_t, t, s, c) = x_t - t V is its clean-sample head (Eq. 6). s = t is an ordinary flow-matching call.

Prediction target (ours, see README): by default the head predicts the clean image x0_hat and the
velocity follows from Eq. 6 as V = (x_t - x0_hat) / t, so G = x0_hat exactly and every loss of the paper is
unchanged. In pixel space with p x p patches (tiny: 8x8, 192 numbers per token) a V head must reproduce the noise
token by token, which a small network does badly at t ~ 1, i.e. exactly where one-step sampling starts
(Li & He, "Back to Basics: Let Denoising Generative Models Denoise", 2025). `prediction="v"` gives the
paper's V head for comparison.

Text: a small transformer trained from scratch over the tokenizer's ids, with a learned start token that
is always present, so the empty prompt (all padding) is the start token alone: a learned null prompt.
Image tokens and text tokens attend to each other in every block (joint attention, as in FLUX's
single-stream blocks; the paper's MM-DiT has 8 double-stream blocks, with separate weights for text and
image tokens, then 16 single-stream ones; we use single-stream blocks only), which needs no extra
cross-attention layers; the pooled text vector is also added to the time embedding, which drives adaLN-Zero
modulation. Positions: fixed 2-D sine-cosine embeddings (the paper's FLUX backbone uses 2-D RoPE).
Checkpoints are saved, loaded and turned back into a model here (save_checkpoint, load_checkpoint,
from_checkpoint), so that sampling and evaluation need only this file and data.py's tokenizer.

    python model.py            # prints the parameter count of every size
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# sizes: tiny trains on a 2-core CPU at 32 px; the others are meant for a GPU at 64 px and above. Parameter counts
# are `python model.py`'s, with a 1024-token vocabulary; tiny on shapes' ~100-token vocabulary has 1.8M
MODELS = {
    "tiny": dict(dim=128, depth=4, heads=4, patch=8, text_layers=2),    # 1.9M, the CPU default
    "small": dict(dim=256, depth=8, heads=8, patch=4, text_layers=3),   # 13M
    "base": dict(dim=384, depth=12, heads=6, patch=4, text_layers=4),    # 40M
    "large": dict(dim=768, depth=16, heads=12, patch=4, text_layers=6),  # 217M
}


def sinusoid(t, dim=256, scale=1000.0):
    """(B,) times in [0, 1] -> (B, dim) sinusoidal features of scale * t (DiT's timestep embedding)."""
    half, dtype = dim // 2, torch.float64 if t.dtype == torch.float64 else torch.float32  # fp32 at least
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = scale * t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim, grid):
    """Fixed 2D sine-cosine position embedding for a grid x grid of patches: (grid * grid, dim)."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out = [f(c.flatten()[:, None] * omega[None]) for c in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimeMLP(nn.Module):
    """sinusoid features -> (B, D) embedding."""

    def __init__(self, dim, freq_dim=256, scale=1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(sinusoid(t, self.freq_dim, self.scale))


class Attention(nn.Module):
    """Multi-head self-attention with a key padding mask."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, keep):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])          # (B, nh, T, hs)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class TextBlock(nn.Module):
    """Pre-LayerNorm transformer block for the text encoder."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x, keep):
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> tokens (B, 1 + L, D), their keep-mask, and a pooled vector (B, D).

    A learned start token leads every sequence; the empty prompt (all padding) is the start token alone."""

    def __init__(self, vocab_size, max_len, dim, heads, layers):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.start = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, max_len + 1, dim))
        self.blocks = nn.ModuleList([TextBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids):
        B, L = ids.shape
        x = torch.cat([self.start.expand(B, -1, -1), self.tok(ids)], dim=1) + self.pos[:, :L + 1]  # (B, 1+L, D)
        keep = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids != 0], dim=1)         # (B, 1+L)
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)                          # (B, D)
        return x, keep, pooled


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block over the joint sequence [text tokens; image tokens]."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, keep):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), keep)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each image token to its patch of output (channels per pixel)."""

    def __init__(self, dim, patch, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Text-to-image DiT with two time inputs: V(x_t, t, s, c)."""

    def __init__(self, vocab_size, max_text_len=24, image_size=32, channels=3,
                 dim=128, depth=4, heads=4, patch=4, text_layers=2, prediction="x", time_scale=1000.0):
        super().__init__()
        assert prediction in ("x", "v"), prediction
        self.prediction = prediction
        assert image_size % patch == 0, f"image size {image_size} must be a multiple of the patch size {patch}"
        self.patch, self.channels, self.grid = patch, channels, image_size // patch
        self.x_embed = nn.Linear(patch * patch * channels, dim)
        self.register_buffer("pos", sincos_2d(dim, self.grid)[None], persistent=False)  # (1, T, D)
        # time_scale: features of sin(scale * t); DiT's 1000 by default. d/dt of the features grows with the scale,
        # which matters to a method that differentiates the network in t (MeanFlow's JVP, losses.py)
        self.t_embed = TimeMLP(dim, scale=time_scale)  # MLP_t(sinusoid(t))
        self.s_embed = TimeMLP(dim, scale=time_scale)  # MLP_s(sinusoid(t - s))   (paper S.2)
        self.text = TextEncoder(vocab_size, max_text_len, dim, heads, text_layers)
        self.text_proj = nn.Linear(dim, dim)  # pooled text -> added to the time embedding
        self.blocks = nn.ModuleList([DiTBlock(dim, heads) for _ in range(depth)])
        self.final = FinalLayer(dim, patch, channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # transformer layers: Xavier-uniform weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text.tok.weight, std=0.02)  # token, start and position embeddings: small normal
        nn.init.normal_(self.text.start, std=0.02)
        nn.init.normal_(self.text.pos, std=0.02)
        for mlp in (self.t_embed.mlp, self.s_embed.mlp):  # time MLPs: normal(0.02), as in DiT
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        nn.init.zeros_(self.s_embed.mlp[2].weight)  # zero-out MLP_s: the model starts as plain flow matching
        for block in self.blocks:  # zero-out adaLN modulation: every block starts as the identity
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)  # zero-out the output layer: the head outputs 0 at start
        nn.init.zeros_(self.final.linear.bias)

    def patchify(self, x):
        B, C, H, W = x.shape
        p, g = self.patch, H // self.patch
        x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, g, g, p, p, C)
        return x.reshape(B, g * g, p * p * C)                       # (B, T, p*p*C)

    def unpatchify(self, x):
        B, T, D = x.shape
        p, g, C = self.patch, self.grid, D // self.patch ** 2
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)   # (B, C, g, p, g, p)
        return x.reshape(B, C, g * p, g * p)                        # (B, C, H, W)

    def condition(self, t, s, pooled):
        """c = MLP_t(sinusoid(t)) + MLP_s(sinusoid(t - s)) + the pooled text, projected: what adaLN reads (B, D)."""
        return self.t_embed(t) + self.s_embed(t - s) + self.text_proj(pooled)

    def forward(self, x, t, s, ids):
        """x: (B, C, H, W) noisy images x_t; t, s: (B,) times with s <= t; ids: (B, L) text -> V (B, C, H, W)."""
        txt, txt_keep, pooled = self.text(ids)                       # (B, 1+L, D), (B, 1+L), (B, D)
        img = self.x_embed(self.patchify(x)) + self.pos              # (B, T, D), T = H * W / patch ** 2
        c = self.condition(t, s, pooled)                             # (B, D)
        h = torch.cat([txt, img], dim=1)                             # (B, 1+L+T, D): joint attention
        keep = torch.cat([txt_keep, torch.ones_like(img[..., 0], dtype=torch.bool)], dim=1)
        for block in self.blocks:
            h = block(h, c, keep)
        out = self.unpatchify(self.final(h[:, txt.shape[1]:], c))    # image tokens only: (B, C, H, W)
        if self.prediction == "v":
            return out
        return velocity(x, t, out)  # x-prediction: the head predicts the clean image, V follows from Eq. 6


def clean(x_t, t, v):
    """x_t - t V: the clean sample a velocity implies (Eq. 6); t (B,)."""
    return x_t - t.view(-1, 1, 1, 1) * v


def velocity(x_t, t, x0_hat):
    """V = (x_t - x0_hat) / t: the velocity a clean-sample prediction implies (Eq. 6 solved for V); t (B,)."""
    return (x_t - x0_hat) / t.clamp_min(1e-4).view(-1, 1, 1, 1)


def G(model, x_t, t, s, ids):
    """The clean-sample head G(x_t, t, s, c) = x_t - t V(x_t, t, s, c)   (Eq. 6)."""
    return clean(x_t, t, model(x_t, t, s, ids))


def build(size, vocab_size, max_text_len, image_size, prediction="x", **overrides):
    """A DiT of a named size; overrides (dim, depth, heads, patch, time_scale, ...) replace its fields."""
    if size not in MODELS:
        raise ValueError(f"unknown model size {size!r}; choose from {list(MODELS)}")
    return DiT(vocab_size, max_text_len, image_size, prediction=prediction, **{**MODELS[size], **overrides})


# -----------------------------------------------------------------------------
# EMA: the weights we sample from and, for Self-E, the conditional evaluator's weights

@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema <- decay' ema + (1 - decay') model, with decay' = min(decay, (1+step)/(10+step)): a warm-up so the
    early EMA is not stuck near the random init."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


# -----------------------------------------------------------------------------
# checkpoints: plain dicts of tensors and config, loaded with weights_only=True (a checkpoint cannot run code)

def save_checkpoint(path, **state):
    """Atomic: write a temporary file, then rename it over the old checkpoint. If the write fails (disk full,
    permissions), the previous checkpoint is left as it was and the error says so."""
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        kept = f"the previous checkpoint {path} is intact" if os.path.exists(path) else "no checkpoint was written"
        raise SystemExit(f"error: could not write the checkpoint {path} ({type(e).__name__}: {e}); {kept}")


def snapshot_name(minutes=None, step=None):
    """The file train.py keeps a copy of the checkpoint in when its budget clock passes `minutes`, or after
    optimiser step `step` (learning curves read them)."""
    return f"ckpt_{minutes:g}min.pt" if step is None else f"ckpt_{step}steps.pt"


def load_checkpoint(path):
    """Load a checkpoint made by train.py; weights_only=True: a checkpoint cannot run code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the reason's first line only: torch's advice to load with weights_only=False is not ours
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: {path} is not a readable checkpoint of this project ({reason})")
    if not isinstance(ckpt, dict) or not {"ema", "config", "tokenizer"} <= set(ckpt):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (no ema/config/tokenizer in it)")
    return ckpt


def export_weights(ckpt, path, half=True):
    """Weights to ship: the EMA (fp16 if half; loading casts back to fp32), config and tokenizer, no optimiser."""
    ema = {k: v.half() if half and v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    save_checkpoint(path, ema=ema, config=ckpt["config"], tokenizer=ckpt["tokenizer"], step=ckpt["step"],
                    elapsed=ckpt["elapsed"])


def config_arch(cfg):
    """The network fields a run's config stores (train.py writes them all into config["arch"])."""
    return cfg.get("arch", {})


def from_checkpoint(ckpt, vocab_size, weights="ema"):
    """The network a checkpoint's config describes, with its EMA (default) or live weights, in eval mode
    (fp32: fp16 weights of an exported checkpoint are cast on loading)."""
    cfg = ckpt["config"]
    net = build(cfg["model"], vocab_size, cfg["max_text_len"], cfg["image_size"], cfg.get("prediction", "x"),
                **config_arch(cfg))
    net.load_state_dict(ckpt[weights])
    return net.eval()


if __name__ == "__main__":
    for name in MODELS:
        m = build(name, vocab_size=1024, max_text_len=24, image_size=32)
        print(f"{name:6s} {sum(p.numel() for p in m.parameters()) / 1e6:7.2f}M params")
