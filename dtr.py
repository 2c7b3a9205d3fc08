"""Denoising Task Routing for Diffusion Models (Park et al., ICLR 2024) in one file.

Each diffusion timestep t is a task. A fixed binary mask m_t selects the channels that enter every residual
block, z' = z + Block(m_t * z) (Eq. 3), so neighbouring timesteps share channels and distant ones do not.
Reading order follows the paper: routing masks -> routed DiT -> routed ADM (UNet) -> Gaussian diffusion.

    python dtr.py masks --kind dtr --channels 1152 --out masks.png       # paper Fig. 2
    python dtr.py bench --model DiT-S/2 --image-size 32 --batch-size 8   # DTR's cost (paper Tab. 7)
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTINGS = ("dtr", "random", "cdtr", "ercdt", "none")


#################################################################################
#                       Routing Masks (Sec. 4.2-4.3, App. F)                    #
#################################################################################

def dtr_masks(num_tasks, channels, alpha=4.0, beta=0.8):
    """DTR masks (T, C): a window of int(beta*C) active channels sliding right as t grows (App. A, Code 1)."""
    active = int(beta * channels)
    # Eq. (4) places task t's window at round((C - C_beta) * ((t-1)/T)^alpha) for t = 1..T. The official code, which
    # produced the paper's numbers, uses round((C - C_beta) * (t/(T-1))^alpha) for t = 0..T-1 (numpy's linspace and
    # round-half-to-even); we follow the code so masks match it element for element.
    offsets = (np.linspace(0, 1, num_tasks) ** alpha * (channels - active)).round().astype(np.int64)
    cols = torch.arange(channels)
    start = torch.from_numpy(offsets)[:, None]
    return ((cols >= start) & (cols < start + active)).float()


def random_masks(num_tasks, channels, beta=0.8, seed=0, generator=None):
    """R-TR masks (T, C): int(beta*C) channels per task drawn uniformly at random, independently per task (Sec. 4.2)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    chosen = torch.rand(num_tasks, channels, generator=g).argsort(dim=1)[:, : int(beta * channels)]
    return torch.zeros(num_tasks, channels).scatter_(1, chosen, 1.0)


def timestep_clusters(num_clusters, num_timesteps):
    """K uniform timestep clusters [lo, hi), as the official ANT-UW re-implementation draws them."""
    bounds = [int(num_timesteps / num_clusters * k) for k in range(num_clusters + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def cluster_index(t, num_clusters, num_timesteps):
    """Cluster id (N,) of each timestep in t (N,)."""
    lows = torch.tensor([lo for lo, _ in timestep_clusters(num_clusters, num_timesteps)], device=t.device)
    return torch.bucketize(t, lows[1:], right=True)


def cluster_masks(num_tasks, channels, kind="cdtr", num_clusters=8, alpha=4.0, beta=0.8):
    """App. F alternatives (T, C): CDTR (DTR over k clusters) or ERCDT (half shared, half split among clusters)."""
    k = cluster_index(torch.arange(num_tasks), num_clusters, num_tasks)  # (T,)
    if kind == "cdtr":  # every timestep of a cluster uses that cluster's row of a k-task DTR table
        return dtr_masks(num_clusters, channels, alpha, beta)[k]
    # ERCDT: channels [0, C/2) serve every task; the rest is cut into k contiguous segments, one per cluster in time
    # order. There is no official code; beta does not apply (each row has C/2 + its segment active).
    shared = channels // 2
    edges = [shared + (channels - shared) * j // num_clusters for j in range(num_clusters + 1)]
    cols = torch.arange(channels)
    lo, hi = torch.tensor(edges[:-1])[k, None], torch.tensor(edges[1:])[k, None]
    return ((cols < shared) | ((cols >= lo) & (cols < hi))).float()


def routing_masks(kind, num_tasks, channels, alpha=4.0, beta=0.8, seed=0, num_clusters=8):
    """Masks (T, C) of any routing kind: dtr, random (R-TR), cdtr, ercdt, or none (all ones, i.e. beta = 1)."""
    if kind not in ROUTINGS:
        raise ValueError(f"unknown routing kind {kind!r}; choose one of {', '.join(ROUTINGS)}")
    if not 0 < beta <= 1:
        raise ValueError(f"activation ratio beta must be in (0, 1], got {beta}")
    if not alpha > 0:
        raise ValueError(f"shifting exponent alpha must be > 0, got {alpha}")
    if kind == "dtr":
        return dtr_masks(num_tasks, channels, alpha, beta)
    if kind == "random":
        return random_masks(num_tasks, channels, beta, seed)
    if kind in ("cdtr", "ercdt"):
        return cluster_masks(num_tasks, channels, kind, num_clusters, alpha, beta)
    return torch.ones(num_tasks, channels)


class TaskRouter(nn.Module):
    """The routing masks of a network's blocks; forward(t) hands every block its (N, C) mask for timesteps t."""

    def __init__(self, widths, kind="dtr", num_tasks=1000, alpha=4.0, beta=0.8, seed=0):
        super().__init__()
        self.kind, self.num_blocks = kind, len(widths)
        routing_masks(kind, 1, 1, alpha, beta)  # validate arguments even when no table is built
        if kind == "none":
            return
        # Deterministic kinds give every block of the same width the same masks, so one table per width is kept.
        # R-TR draws each block's masks independently (as the official code does), all from one seeded generator.
        per_block = kind == "random"
        keys = list(range(len(widths))) if per_block else sorted(set(widths))
        self.table_of_block = [i if per_block else keys.index(w) for i, w in enumerate(widths)]
        g = torch.Generator().manual_seed(seed)
        for j, key in enumerate(keys):
            c = widths[key] if per_block else key
            m = random_masks(num_tasks, c, beta, generator=g) if per_block else routing_masks(kind, num_tasks, c, alpha, beta)
            # Derived state: bool (4x smaller than float), unaffected by .half(), never saved in a state_dict.
            self.register_buffer(f"table{j}", m.bool(), persistent=False)

    def forward(self, t, dtype=torch.float32):
        """List of per-block masks (N, C) for timesteps t (N,), or Nones when routing is off."""
        if self.kind == "none":
            return [None] * self.num_blocks
        t = t.long()
        rows = [table[t].to(dtype) for table in self.buffers()]  # one gather per table, once per forward
        return [rows[j] for j in self.table_of_block]


#################################################################################
#                  Embeddings for Timesteps, Class Labels and Patches           #
#################################################################################

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (N, dim) of timesteps t (N,), [cos | sin] as in GLIDE / ADM / DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (grid_size**2, dim): first half encodes the column, second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def embed(pos):  # (G*G,) -> (G*G, dim/2)
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Timesteps (N,) -> vectors (N, D) through a sinusoidal embedding and an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Labels (N,) -> vectors (N, D); during training drops labels to the null class `num_classes` for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)  # + null-class row
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Images (N, C, H, W) -> tokens (N, T, D) with a stride-p convolution."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size, self.num_patches = patch_size, (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class GuidedModel(nn.Module):
    """Adds classifier-free guidance to a class-conditional denoiser forward(x, t, y)."""

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        """Batch [cond | uncond] -> guided output; guides all `in_channels` eps channels unless told otherwise."""
        # x's second half repeats the first; y's second half holds the null class. facebookresearch/DiT guides only
        # 3 of 4 latent channels "for exact reproducibility"; that is a bug kept for its FID numbers, so here it is
        # only an option (guided_channels=3). The learned-sigma channels are passed through unguided.
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        g = self.in_channels if guided_channels is None else guided_channels
        cond, uncond = out[:, :g].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, g:]], dim=1)


#################################################################################
#                     DiT with Denoising Task Routing (App. A.1)                #
#################################################################################

def modulate(x, shift, scale):
    """adaLN: x (N, T, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention (N, T, D) -> (N, T, D), laid out as timm's (qkv, proj)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    """Pointwise feed-forward (fc1, tanh-GELU, fc2), laid out as timm's Mlp."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block, routed: z' = (1 - m_t) * z + DiTBlock(m_t * z)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, mask=None):
        """x (N, T, D), condition c (N, D), routing mask (N, D) or None."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = x if mask is None else x * mask[:, None]  # m_t * z
        h = h + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift_msa, scale_msa))  # Eq. (5)
        h = h + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))
        if mask is None:
            return h
        return torch.addcmul(h, x, 1 - mask[:, None])  # Eq. (8); exact, since x * (1 - m) is x or 0


class FinalLayer(nn.Module):
    """adaLN + linear decoder of tokens (N, T, D) into patches (N, T, p*p*C_out)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(GuidedModel):
    """Diffusion Transformer with task routing; parameters (and state_dict) identical to facebookresearch/DiT."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,  # 1 for unconditional models (no label dropout then), as the DiT and DTR authors do
        learn_sigma=True,
        routing="dtr",
        alpha=4.0,
        beta=0.8,
        num_tasks=1000,  # = diffusion steps T
        routing_seed=0,  # only R-TR masks are random
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.num_classes = patch_size, num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, 0.0 if num_classes == 1 else class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.router = TaskRouter([hidden_size] * depth, routing, num_tasks, alpha, beta, routing_seed)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's scheme: xavier linears, frozen sin-cos positions, N(0, 0.02) embeddings, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches**0.5)))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch projection is a linear layer
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x):
        """Patches (N, T, p*p*C) -> images (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y=None):
        """x (N, C, H, W), integer timesteps t (N,), labels y (N,) (None: unconditional) -> (N, C_out, H, W)."""
        y = torch.zeros_like(t, dtype=torch.long) if y is None else y
        masks = self.router(t, x.dtype)  # looked up once, handed to each block
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block, mask in zip(self.blocks, masks):
            x = block(x, c, mask)
        return self.unpatchify(self.final_layer(x, c))


def _dit(depth, hidden_size, patch_size, num_heads):
    return lambda **kw: DiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kw)


DiT_models = {
    **{f"DiT-XL/{p}": _dit(28, 1152, p, 16) for p in (2, 4, 8)},
    **{f"DiT-L/{p}": _dit(24, 1024, p, 16) for p in (2, 4, 8)},
    **{f"DiT-B/{p}": _dit(12, 768, p, 12) for p in (2, 4, 8)},
    **{f"DiT-S/{p}": _dit(12, 384, p, 6) for p in (2, 4, 8)},
    "DiT-T/2": _dit(4, 128, 2, 4),  # tiny: tests and the CPU demo
}


#################################################################################
#                          Gaussian Diffusion (DDPM / IDDPM)                    #
#################################################################################

def get_named_beta_schedule(name, num_timesteps):
    """Betas (T,) float64: 'linear' (DDPM, scaled to T) or 'cosine' (IDDPM's squared cosine, beta <= 0.999)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        steps = [(i / num_timesteps, (i + 1) / num_timesteps) for i in range(num_timesteps)]
        return np.array([min(1 - alpha_bar(b) / alpha_bar(a), 0.999) for a, b in steps], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_timesteps, section_counts):
    """Timesteps kept by respacing: '250' -> 250 evenly spaced steps of T; '10,15' -> per-section counts; 'ddimN'."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = int(section_counts[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {count} steps with an integer stride")
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (i < extra)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride, pos = 1 if count <= 1 else (size - 1) / (count - 1), 0.0
        for _ in range(count):  # accumulated like guided-diffusion, so rounding ties fall the same way
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


def mean_flat(x):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data x in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)), elementwise."""
    approx_cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = approx_cdf(inv_std * (centered + 1 / 255)), approx_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def randn(shape, generators=None, device=None):
    """Standard normal (N, ...) noise; with one torch.Generator per sample, sample i's noise depends on its own alone."""
    if generators is None:
        return torch.randn(shape, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generators]).to(device)


class GaussianDiffusion:
    """Forward process, hybrid loss and DDPM / DDIM samplers over a (possibly respaced) beta schedule."""

    LOSS_WEIGHTS = ("constant", "min-snr", "p2")

    def __init__(self, betas, timestep_map=None, learn_sigma=True, sigma_small=False, predict_xstart=False,
                 loss_weight="constant", min_snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0):
        if loss_weight not in self.LOSS_WEIGHTS:
            raise ValueError(f"unknown loss weight {loss_weight!r}; choose one of {', '.join(self.LOSS_WEIGHTS)}")
        betas = np.asarray(betas, dtype=np.float64)  # schedules in float64, as guided-diffusion and DiT
        self.num_timesteps = len(betas)
        self.timestep_map = torch.as_tensor(np.arange(len(betas)) if timestep_map is None else timestep_map).long()
        self.learn_sigma, self.sigma_small, self.predict_xstart = learn_sigma, sigma_small, predict_xstart
        self.loss_weight, self.min_snr_gamma, self.p2_gamma, self.p2_k = loss_weight, min_snr_gamma, p2_gamma, p2_k

        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        # the posterior variance is 0 at t=0, so its log is clipped to the t=1 value
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.array([])
        large_var = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas
        tables = dict(
            betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=acp_prev, snrs=acp / (1.0 - acp),
            sqrt_alphas_cumprod=np.sqrt(acp), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1),
            posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
            log_betas=np.log(betas), fixed_large_variance=large_var, fixed_large_log_variance=np.log(large_var),
        )
        for name, arr in tables.items():
            setattr(self, name, torch.from_numpy(np.asarray(arr, dtype=np.float64)))

    def _at(self, name, t, ndim=4):
        """Table `name` at timesteps t (N,), as float32 (N, 1, ..., 1) for broadcasting against ndim-D tensors."""
        return getattr(self, name).to(t.device)[t].float().reshape(-1, *[1] * (ndim - 1))

    def _model(self, model, x, t, model_kwargs):
        """The network always sees original timesteps (respacing maps its step index back)."""
        return model(x, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))

    # -- forward process ---------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return self._at("sqrt_alphas_cumprod", t, x_start.ndim) * x_start + self._at("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = self._at("posterior_mean_coef1", t, n) * x_start + self._at("posterior_mean_coef2", t, n) * x_t
        return mean, self._at("posterior_variance", t, n), self._at("posterior_log_variance_clipped", t, n)

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return self._at("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps

    def predict_eps_from_xstart(self, x_t, t, x_start):
        """Inverse of predict_xstart_from_eps."""
        n = x_t.ndim
        return (self._at("sqrt_recip_alphas_cumprod", t, n) * x_t - x_start) / self._at("sqrt_recipm1_alphas_cumprod", t, n)

    # -- reverse process ---------------------------------------------------------
    def p_mean_variance(self, model, x, t, clip_denoised=False, model_kwargs=None, model_output=None):
        """p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart (all like x)."""
        out = self._model(model, x, t, model_kwargs) if model_output is None else model_output
        n, c = x.shape[:2]
        if self.learn_sigma:  # learned range: v in [-1, 1] interpolates log beta_t and log beta~_t (IDDPM)
            out, v = out.split(c, dim=1)
            frac = (v + 1) / 2
            log_var = frac * self._at("log_betas", t, x.ndim) + (1 - frac) * self._at("posterior_log_variance_clipped", t, x.ndim)
            variance = torch.exp(log_var)
        else:  # fixed: beta~_t (small) or beta_t with beta~_1 at t = 0 (large)
            names = ("posterior_variance", "posterior_log_variance_clipped") if self.sigma_small else ("fixed_large_variance", "fixed_large_log_variance")
            variance, log_var = (self._at(name, t, x.ndim).expand_as(x) for name in names)
        x0 = out if self.predict_xstart else self.predict_xstart_from_eps(x, t, out)
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        mean, _, _ = self.q_posterior_mean_variance(x0, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_var, "pred_xstart": x0}

    def p_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, noise=None):
        """One ancestral DDPM step x_t -> x_{t-1} (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        noise = torch.randn_like(x) if noise is None else noise
        nonzero = (t != 0).float().reshape(-1, *[1] * (x.ndim - 1))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, noise=None, eta=0.0):
        """One DDIM step (Song et al. Eq. 12); eta = 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar, abar_prev = self._at("alphas_cumprod", t, x.ndim), self._at("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = (t != 0).float().reshape(-1, *[1] * (x.ndim - 1))
        if eta > 0:
            mean = mean + nonzero * sigma * (torch.randn_like(x) if noise is None else noise)
        return {"sample": mean, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                      progress=False, generators=None, sampler="ddpm", eta=0.0):
        """Sample (N, C, H, W) from x_T ~ N(0, I) (or `noise`); per-sample `generators` make every draw reproducible."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
        device = device if device is not None else noise.device if noise is not None else "cpu"
        x = randn(shape, generators, device) if noise is None else noise.to(device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, leave=False)
        for i in steps:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            z = randn(shape, generators, device) if generators is not None else None
            if sampler == "ddpm":
                x = self.p_sample(model, x, t, clip_denoised, model_kwargs, z)["sample"]
            else:
                x = self.ddim_sample(model, x, t, clip_denoised, model_kwargs, z, eta)["sample"]
        return x

    # -- training ----------------------------------------------------------------
    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t (N,), float32."""
        return self._at("snrs", t, 1)

    def mse_weight(self, t):
        """Per-sample weight (N,) of the MSE term: constant, Min-SNR-gamma or P2."""
        snr = self.snr(t)
        if self.loss_weight == "min-snr":  # Hang et al. 2023: min(SNR, gamma), divided by SNR for eps-prediction
            w = snr.clamp(max=self.min_snr_gamma)
            return w if self.predict_xstart else w / snr
        if self.loss_weight == "p2":  # Choi et al. 2022: 1 / (k + SNR)^gamma, one weight per sample. The official DTR
            return 1.0 / (self.p2_k + snr) ** self.p2_gamma  # port broadcasts it against the image width instead.
        return torch.ones_like(snr)

    def vb_terms_bpd(self, x_start, x_t, t, out):
        """Variational bound term (N,) in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Hybrid loss (IDDPM): {'loss', 'mse', 'vb'}, each (N,); 'mse' is weighted, 'vb' trains sigma only."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = self._model(model, x_t, t, model_kwargs)
        c = x_start.shape[1]
        eps_or_x0 = out[:, :c]
        vb = torch.zeros(len(x_start), device=x_start.device)
        if self.learn_sigma:  # the VB term sees a frozen mean, so it only trains the variance
            frozen = torch.cat([eps_or_x0.detach(), out[:, c:]], dim=1)
            vb = self.vb_terms_bpd(x_start, x_t, t, self.p_mean_variance(None, x_t, t, model_output=frozen))
        target = x_start if self.predict_xstart else noise
        mse = self.mse_weight(t) * mean_flat((target - eps_or_x0) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(timestep_respacing, noise_schedule="linear", learn_sigma=True, sigma_small=False,
                     predict_xstart=False, diffusion_steps=1000, **loss_kw):
    """A GaussianDiffusion over `diffusion_steps`, respaced to `timestep_respacing` ('' or None: all steps)."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    sections = [timestep_respacing] if isinstance(timestep_respacing, int) else timestep_respacing or [diffusion_steps]
    kept = sorted(space_timesteps(diffusion_steps, sections))
    acp = np.cumprod(1.0 - betas)[kept]
    spaced_betas = 1 - acp / np.append(1.0, acp[:-1])  # same abar at the kept steps
    return GaussianDiffusion(spaced_betas, kept, learn_sigma, sigma_small, predict_xstart, **loss_kw)


#################################################################################
#              ANT-UW: uncertainty-weighted timestep clusters (App. C)          #
#################################################################################

def sample_timesteps(batch_size, num_timesteps, num_clusters=None, device=None, generator=None):
    """Timesteps (N,): uniform, or stratified with N/K from each of K uniform clusters (in cluster order)."""
    if num_clusters is None:
        return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)
    if batch_size % num_clusters:
        raise ValueError(f"batch size {batch_size} is not divisible by the number of timestep clusters {num_clusters}")
    per = batch_size // num_clusters
    return torch.cat([torch.randint(lo, hi, (per,), device=device, generator=generator)
                      for lo, hi in timestep_clusters(num_clusters, num_timesteps)])


def uncertainty_weighted_loss(loss, t, log_vars, num_timesteps):
    """sum_k 0.5 * (exp(-s_k) * L_k + s_k) with L_k the mean loss of cluster k over K (Kendall et al.; ANT-UW)."""
    k = len(log_vars)
    idx = cluster_index(t, k, num_timesteps)
    sums = torch.zeros(k, device=loss.device, dtype=loss.dtype).index_add(0, idx, loss)
    counts = torch.bincount(idx, minlength=k)
    seen = counts > 0  # with stratified sampling every cluster is seen
    cluster_loss = sums[seen] / counts[seen] / k
    return (0.5 * (torch.exp(-log_vars[seen]) * cluster_loss + log_vars[seen])).sum()


#################################################################################
#                        Command line: mask pictures and benchmark              #
#################################################################################

def create_model(name, **kwargs):
    """A model from the registries by name, e.g. create_model('DiT-S/2', input_size=32, routing='dtr')."""
    registry = {**DiT_models}
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(registry)}")
    return registry[name](**kwargs)


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto `path`: readers never see a half-written file."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def draw_masks(masks):
    """(T, C) 0/1 masks -> (3, T, C) image, active channels yellow and inactive purple as in the paper's Fig. 2."""
    on, off = torch.tensor([253, 231, 37]) / 255, torch.tensor([68, 1, 84]) / 255  # viridis' ends
    return masks[None] * on[:, None, None] + (1 - masks[None]) * off[:, None, None]


def masks_main(args):
    """Save the routing-mask table as a PNG: one row per task t (top: t = 0), one column per channel."""
    from torchvision.utils import save_image
    m = routing_masks(args.kind, args.tasks, args.channels, args.alpha, args.beta, args.seed)
    atomic_write(args.out, lambda tmp: save_image(draw_masks(m), tmp, format="png"))
    print(f"wrote {args.out}: {args.kind} masks, {args.tasks} tasks x {args.channels} channels, {int(m[0].sum())} active in row 0")


def bench_main(args):
    """Median forward+backward step time per routing kind, interleaved so drift hits all kinds alike."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    kinds = ("none", "random", "dtr")
    models = {k: create_model(args.model, input_size=args.image_size, routing=k).to(device) for k in kinds}
    for k in kinds[1:]:
        models[k].load_state_dict(models["none"].state_dict())
    ref = models["none"]
    x = torch.randn(args.batch_size, ref.in_channels, args.image_size, args.image_size, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    y = torch.randint(0, ref.num_classes, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(model):
        sync()
        start = time.perf_counter()
        model(x, t, y).square().mean().backward()
        sync()
        return time.perf_counter() - start

    times = {k: [] for k in kinds}
    for rep in range(args.warmup + args.steps):
        for k in kinds[rep % 3:] + kinds[: rep % 3]:  # rotate the order every repetition
            dt = step(models[k])
            models[k].zero_grad(set_to_none=True)
            if rep >= args.warmup:
                times[k].append(dt)
    base = statistics.median(times["none"])
    print(f"{args.model}  input {args.image_size}x{args.image_size}  batch {args.batch_size}  {device}  "
          f"threads {torch.get_num_threads()}  {args.steps} steps")
    for k in kinds:
        med = statistics.median(times[k])
        print(f"  {k:<7} {1000 * med:9.2f} ms/step   {'' if k == 'none' else f'{100 * (med / base - 1):+.2f}% vs none'}")


def main(args):
    {"masks": masks_main, "bench": bench_main}[args.command](args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("masks", help="draw a routing-mask table (paper Fig. 2)")
    p.add_argument("--kind", choices=ROUTINGS, default="dtr")
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument("--channels", type=int, default=1152)
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="masks.png")
    p = sub.add_parser("bench", help="time forward+backward with routing none / random / dtr")
    p.add_argument("--model", choices=list(DiT_models), default="DiT-S/2")
    p.add_argument("--image-size", type=int, default=32, help="the network's input side (latent side for DiT)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    try:
        main(parser.parse_args())
    except ValueError as e:  # bad arguments: one line, non-zero exit
        sys.exit(f"dtr.py: error: {e}")
