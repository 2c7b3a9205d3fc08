"""Denoising Task Routing for Diffusion Models (Park et al., ICLR 2024) in one file.

Each diffusion timestep t is a task. A fixed binary mask m_t selects the channels that enter every residual
block, z' = z + Block(m_t * z) in ADM and z' = (1 - m_t) * z + DiTBlock(m_t * z) in DiT (the paper's equations are
cited as Eq. (N) where the code implements them), so neighbouring timesteps share channels and distant ones do not.
Reading order follows the paper: routing masks -> routed DiT (class- or text-conditional) -> routed ADM (UNet) ->
Gaussian diffusion -> ANT-UW; then what the scripts share: a run's model_args -> model and diffusion, checkpoint
reading, generate (sampling with CFG), Stable Diffusion's VAE and CLIP, torchrun set-up, atomic writes, InputError.

    python dtr.py masks --kind dtr --channels 1152 --out masks.png       # paper Fig. 2
    python dtr.py bench --model DiT-S/2 --image-size 32 --batch-size 8   # DTR's cost (paper Tab. 7)
    python dtr.py plot results/000-DiT-L-2-none results/001-DiT-L-2-dtr --out curves.png   # loss and FID vs steps
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import struct
import sys
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROUTINGS = ("dtr", "random", "cdtr", "ercdt", "none")


class InputError(ValueError):
    """Unusable input (a flag, file or checkpoint): each script's main() reports it as one line and exits 1."""


#################################################################################
#                       Routing Masks (Sec. 4.2-4.3, App. F)                    #
#################################################################################


def dtr_masks(num_tasks, channels, alpha=4.0, beta=0.8):
    """DTR masks (T, C): a window of int(beta*C) active channels sliding right as t grows (App. A, Code 1)."""
    active = active_channels(channels, beta)
    # Eq. (4) places task t's window at round((C - C_beta) * ((t-1)/T)^alpha) for t = 1..T. The official code, which
    # produced the paper's numbers, uses round((C - C_beta) * (t/(T-1))^alpha) for t = 0..T-1 (numpy's linspace and
    # round-half-to-even); we follow the code so masks match it element for element.
    offsets = (np.linspace(0, 1, num_tasks) ** alpha * (channels - active)).round().astype(np.int64)
    cols = torch.arange(channels)
    start = torch.tensor(offsets)[:, None]  # on the default device, like cols
    return ((cols >= start) & (cols < start + active)).float()


def active_channels(channels, beta):
    """C_beta = int(beta * C), the channels each task uses; at least one, or the blocks would see nothing."""
    if int(beta * channels) == 0:
        raise InputError(f"activation ratio beta={beta} leaves none of {channels} channels active (int(beta*C) = 0)")
    return int(beta * channels)


def random_masks(num_tasks, channels, beta=0.8, seed=0, generator=None):
    """R-TR masks (T, C): int(beta*C) channels per task drawn uniformly at random, independently per task (Sec. 4.2)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    chosen = torch.rand(num_tasks, channels, generator=g).argsort(dim=1)[:, : active_channels(channels, beta)]
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
        raise InputError(f"unknown routing kind {kind!r}; choose one of {', '.join(ROUTINGS)}")
    if not 0 < beta <= 1:
        raise InputError(f"activation ratio beta must be in (0, 1], got {beta}")
    if not alpha > 0:
        raise InputError(f"shifting exponent alpha must be > 0, got {alpha}")
    if kind == "dtr":
        return dtr_masks(num_tasks, channels, alpha, beta)
    if kind == "random":
        return random_masks(num_tasks, channels, beta, seed)
    if kind in ("cdtr", "ercdt"):
        return cluster_masks(num_tasks, channels, kind, num_clusters, alpha, beta)
    return torch.ones(num_tasks, channels)


class TaskRouter(nn.Module):
    """The routing masks m_t of a network's blocks; forward(t) hands every block its (N, C) mask for timesteps t."""

    def __init__(self, widths, kind="dtr", num_tasks=1000, alpha=4.0, beta=0.8, seed=0):
        super().__init__()
        self.kind, self.num_blocks = kind, len(widths)
        self.widths, self.num_tasks, self.alpha, self.beta, self.seed = list(widths), num_tasks, alpha, beta, seed
        on_cpu(routing_masks, kind, 1, min(widths), alpha, beta)  # validate arguments even when no table is built
        if kind == "none":
            return
        # Deterministic kinds give every block of the same width the same masks, so one table per width is kept.
        # R-TR draws each block's masks independently (as the official code does), all from one seeded generator.
        per_block = kind == "random"
        keys = list(range(len(widths))) if per_block else sorted(set(widths))
        self.table_of_block = [i if per_block else keys.index(w) for i, w in enumerate(widths)]
        for j, key in enumerate(keys):  # derived state: bool (4x smaller than float), never saved in a state_dict
            self.register_buffer(
                f"table{j}",
                torch.empty(num_tasks, widths[key] if per_block else key, dtype=torch.bool),
                persistent=False,
            )
        self.reset_parameters()

    def forward(self, t, dtype=torch.float32):
        """List of per-block masks (N, C) for timesteps t (N,), or Nones when routing is off."""
        if self.kind == "none":
            return [None] * self.num_blocks
        t = t.long()
        rows = [table[t].to(dtype) for table in self.buffers()]  # one gather per table, once per forward
        return [rows[j] for j in self.table_of_block]

    def masks(self):
        """Every table's masks (T, C) in table order; R-TR: every block's own draw, in block order."""
        g = torch.Generator().manual_seed(self.seed)
        widths = [table.shape[1] for table in self.buffers()]
        if self.kind == "random":
            return [random_masks(self.num_tasks, c, self.beta, generator=g) for c in widths]
        return [routing_masks(self.kind, self.num_tasks, c, self.alpha, self.beta) for c in widths]

    @torch.no_grad()
    def reset_parameters(self):
        """(Re)compute the tables in place: at construction, and after a model built on "meta" is materialised
        with to_empty() (FSDP calls reset_parameters() then)."""
        tables = list(self.buffers())
        if not tables or tables[0].is_meta:  # a meta tensor holds no values
            return
        for table, masks in zip(tables, on_cpu(self.masks)):  # the same masks whatever the device
            table.copy_(masks)


def on_cpu(f, *args):
    """f(*args) with new tensors on the CPU, also inside a torch.device("meta") context (models built for FSDP)."""
    with torch.device("cpu"):
        return f(*args)


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
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )

    def embed(pos):  # (G*G,) -> (G*G, dim/2)
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Timesteps (N,) -> vectors (N, D) through a sinusoidal embedding and an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


def drop_ids(n, prob, force_drop_ids=None, device=None):
    """Which of n conditions CFG training drops (N,) bool: force_drop_ids if given, else each with probability prob;
    None when none can be dropped (prob 0)."""
    if force_drop_ids is not None:  # bool, or integer with 1 = drop as facebookresearch/DiT passes them
        return force_drop_ids == 1
    return None if prob == 0 else torch.rand(n, device=device) < prob


def drop_labels(labels, null_class, prob, force_drop_ids=None):
    """Labels (N,) with the null class where CFG training drops them: with probability prob, or force_drop_ids (N,)."""
    drop = drop_ids(len(labels), prob, force_drop_ids, labels.device)
    return labels if drop is None else torch.where(drop, null_class, labels)


class LabelEmbedder(nn.Module):
    """Labels (N,) -> vectors (N, D); during training drops labels to the null class `num_classes` for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)  # + null-class row
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        return self.embedding_table(
            drop_labels(labels, self.num_classes, self.dropout_prob if train else 0.0, force_drop_ids)
        )


class PatchEmbed(nn.Module):
    """Images (N, C, H, W) -> tokens (N, T, D) with a stride-p convolution."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size, self.num_patches = patch_size, (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def drop_context(context, mask, null, prob, force_drop_ids=None):
    """Replace captions (N, L, C) by the null token (1, C) with probability prob, or where force_drop_ids (N,) is True.

    A dropped row holds L copies of the null token, so attending to it gives the null token's value whatever L is; its
    key mask (N, L), if any, becomes all True (a row with no key to attend to has no defined attention)."""
    drop = drop_ids(len(context), prob, force_drop_ids, context.device)
    if drop is None:
        return context, mask
    context = torch.where(drop[:, None, None], null.to(context.dtype), context)
    return context, None if mask is None else mask | drop[:, None]


class GuidedModel(nn.Module):
    """Adds classifier-free guidance to a conditional denoiser forward(x, t, y, force_drop_ids, **kwargs)."""

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None, **kwargs):
        """Batch [cond | uncond] -> guided output; guides all `in_channels` eps channels unless told otherwise."""
        # x's second half repeats the first. The model drops the second half's condition itself (force_drop_ids): the
        # null class for class labels, the null context for text, so y's second half may hold anything (the null
        # class, or a copy of the first half). facebookresearch/DiT guides only 3 of 4 latent channels "for exact
        # reproducibility"; that is a bug kept for its FID numbers, so here it is only an option (guided_channels=3).
        # The learned-sigma channels are passed through unguided.
        half = x[: len(x) // 2]
        dropped = torch.arange(len(x), device=x.device) >= len(half)
        out = self(torch.cat([half, half]), t, y, force_drop_ids=dropped, **kwargs)
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


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from tokens (N, T, D), keys and values from a text context (N, L, C)."""

    def __init__(self, dim, context_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, dim * 2)  # every block reads the encoder's tokens directly (C -> D)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, mask=None):
        """x (N, T, D), context (N, L, C), key mask (N, L) bool (True: a token to attend to) or None -> (N, T, D)."""
        (n, tokens, dim), heads = x.shape, self.num_heads
        q = self.q(x).reshape(n, tokens, heads, dim // heads).transpose(1, 2)  # (N, heads, T, D/heads)
        k, v = self.kv(context).reshape(n, context.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
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
    """adaLN-Zero transformer block, routed by a binary mask m: z' = (1 - m) * z + DiTBlock(m * z).

    With context_dim (text-to-image, App. C, Fig. 8) a cross-attention to the text tokens sits between the
    self-attention and the MLP, with its own LayerNorm and no adaLN (adaLN sees the timestep only). fused=True
    computes the routed block as routed_fused does (below): the same values with fewer full-size passes."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, context_dim=None, *, fused=True):
        super().__init__()
        self.fused = fused
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads)

    def forward(self, x, c, mask=None, context=None, context_mask=None):
        """x (N, T, D), condition c (N, D), routing mask (N, D) or None; text context (N, L, C), key mask (N, L)."""
        if mask is None:
            return self.block(x, c, context, context_mask)
        if not self.fused:
            m = mask[:, None]  # (N, 1, D)
            return (1 - m) * x + self.block(m * x, c, context, context_mask)  # Eq. (8)
        return self.routed_fused(x, c, mask, context, context_mask)

    def block(self, x, c, context=None, context_mask=None):
        """facebookresearch/DiT's block, Eq. (5), op for op (bit-identical): gated self-attention, [cross-attention,]
        gated MLP, each a residual branch."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:  # inside the routed block: the routing wraps self-attention, cross-attention and MLP
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def routed_fused(self, x, c, mask, context=None, context_mask=None):
        """The routed block as Eq. (7) expands it, z + Attn(m * z) + MLP(m * z + Attn(m * z)): for a binary m the
        same as (1 - m) * z + DiTBlock(m * z) up to rounding, with fewer full-size passes. The residual branches,
        computed from the routed stream h = m * z, join z itself, so no (1 - m) product is left; Fork and Join fuse
        the rest (addcmul may round once where DiT's block rounds twice)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h, z = Fork.apply(x, mask[:, None])
        branch = self.attn(modulate(self.norm1(h), shift_msa, scale_msa))
        h, z = join(gate_msa.unsqueeze(1), branch, h, z)  # z: new, and nothing saves it for backward
        if context is not None:
            branch = self.cross_attn(self.norm_cross(h), context, context_mask)
            h, z = h + branch, z.add_(branch)
        (z,) = join(gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp)), z, in_place=True)
        return z


class Fork(torch.autograd.Function):
    """(z, m) -> (m * z, z): a routed block's input stream and its skip, as one autograd node.

    Their gradients meet in a single fused pass, g_z = g_skip + m * g_h (addcmul), where autograd would run a multiply
    and an accumulation; m is binary, so m * g_h is exact and outputs and gradients are bit-identical."""

    @staticmethod
    def forward(ctx, z, mask):
        ctx.save_for_backward(mask)
        return z * mask, z.view_as(z)

    @staticmethod
    def backward(ctx, grad_h, grad_skip):  # an unused output's gradient arrives as zeros (materialize_grads)
        (mask,) = ctx.saved_tensors
        return torch.addcmul(grad_skip, grad_h, mask), None


class Join(torch.autograd.Function):
    """(gate, branch, in_place, *streams) -> every stream + gate * branch: a gated residual branch joins its streams.

    One fused multiply-add pass per stream (addcmul) where DiT's block runs a multiply and an add; in place for fresh
    streams that nothing saved for backward. Backward sums the streams' gradients once and takes the branch's and the
    gate's gradients from the sum, as autograd does for one stream (autograd's own addcmul backward would spend a
    full-size multiply by `value`). addcmul may round once (an FMA), so values can differ from DiT's in the last bit."""

    @staticmethod
    def forward(ctx, gate, branch, in_place, *streams):
        ctx.save_for_backward(gate, branch)
        if in_place:
            ctx.mark_dirty(*streams)
            for s in streams:
                s.addcmul_(gate, branch)
            return streams
        return tuple(torch.addcmul(s, gate, branch) for s in streams)

    @staticmethod
    def backward(ctx, *grads):
        gate, branch = ctx.saved_tensors
        g = sum(grads[1:], grads[0])  # (N, T, D): the branch reaches the loss through every stream
        return (g * branch).sum_to_size(gate.shape), g * gate, None, *grads


def join(gate, branch, *streams, in_place=False):
    """Every stream + gate * branch, as one Join node; in_place only for fresh streams nothing saved for backward."""
    return Join.apply(gate, branch, in_place, *streams)


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
    """Diffusion Transformer with task routing; parameters (and state_dict) identical to facebookresearch/DiT.

    The routing masks are derived, non-persistent buffers, so DiT's checkpoints load with strict=True, and with
    routing="none" the output equals DiT's bit for bit. use_checkpoint adds no parameter.

    With context_dim set it is the paper's text-to-image DiT (App. C, Fig. 8): y is a sequence of text-encoder tokens
    (N, L, context_dim), read by a cross-attention in every block; adaLN is regressed from the timestep alone, there is
    no label embedder, and caption dropout swaps in a learned null token `null_context` (1, context_dim). DTR wraps the
    whole block (Eq. 8), cross-attention included. The cross-attention sits between self-attention and the MLP, with
    self-attention's head layout: its own LayerNorm `norm_cross` (affine, not modulated), queries `cross_attn.q`
    (D -> D), keys and values `cross_attn.kv` (C -> 2D) straight from the encoder's tokens in every block (no shared
    context projection), and an ungated, zero-initialised output `cross_attn.proj`, so every block still starts as the
    identity. These 8 keys per block and `null_context` are all that is added; the class-conditional state dict is
    DiT's. A learned null token rather than the encoder's empty-caption embedding: the model owns its unconditional
    branch, and guidance needs no extra encoder pass."""

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
        num_classes=1000,  # 1 for unconditional models (train.py then sets class_dropout_prob=0, as DTR's code does)
        learn_sigma=True,
        routing="dtr",
        alpha=4.0,
        beta=0.8,
        num_tasks=1000,  # = diffusion steps T
        routing_seed=0,  # only R-TR masks are random
        context_dim=None,  # text-to-image: width of the text tokens (768 for CLIP ViT-L/14); num_classes is ignored
        use_checkpoint=False,  # gradient checkpointing of every block: recompute activations in backward
    ):
        super().__init__()
        self.in_channels, self.use_checkpoint = in_channels, use_checkpoint
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size, self.patch_size, self.num_classes = input_size, patch_size, num_classes
        self.context_dim, self.class_dropout_prob = context_dim, class_dropout_prob
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if context_dim is None:
            # The null row exists whenever class_dropout_prob > 0, even for one class, as in facebookresearch/DiT
            # (the official DTR code drops it for num_classes == 1; its train.py passes class_dropout_prob=0 instead).
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        elif class_dropout_prob > 0:  # the null context exists only for caption dropout, as the null class does
            self.null_context = nn.Parameter(torch.zeros(1, context_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth)])
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
        if self.context_dim is None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        elif hasattr(self, "null_context"):
            nn.init.normal_(self.null_context, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if self.context_dim is not None:  # the ungated cross-attention branch starts at 0
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x):
        """Patches (N, T, p*p*C) -> images (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def labels(self, y, n):
        """Labels (N,) to embed: y; y=None is the one class of a 1-class model, else the null class (CFG's)."""
        if y is not None:
            return y
        device = self.pos_embed.device
        if self.num_classes == 1:
            return torch.zeros(n, dtype=torch.long, device=device)
        if self.y_embedder.dropout_prob == 0:
            raise InputError("a class-conditional DiT needs labels y (it has no null class without label dropout)")
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def context(self, y, mask, n, force_drop_ids=None):
        """Text tokens (N, L, C) and key mask to attend to: y with caption drops to the null token; y=None: all null."""
        if not hasattr(self, "null_context"):
            if y is None or (force_drop_ids is not None and force_drop_ids.any()):
                raise InputError("this text DiT was built without caption dropout: it has no null context")
            return y, mask
        if y is None:
            return self.null_context.expand(n, 1, self.context_dim), None
        return drop_context(
            y, mask, self.null_context, self.class_dropout_prob if self.training else 0.0, force_drop_ids
        )

    def forward(self, x, t, y=None, force_drop_ids=None, context_mask=None):
        """x (N, C, H, W), integer timesteps t (N,), labels y (N,) (None: unconditional) -> (N, C_out, H, W).

        Text models take text tokens y (N, L, C) and an optional key mask context_mask (N, L) (True: a real token)."""
        masks = self.router(t, x.dtype)  # looked up once, handed to each block
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        context = None
        if self.context_dim is None:  # class labels join the timestep in adaLN's condition
            c = c + self.y_embedder(self.labels(y, len(t)), self.training, force_drop_ids)
        else:  # text: adaLN sees the timestep alone, the tokens enter through cross-attention
            context, context_mask = self.context(y, context_mask, len(c), force_drop_ids)
        for block, mask in zip(self.blocks, masks):
            if self.use_checkpoint and torch.is_grad_enabled():  # keep only each block's input for backward
                x = checkpoint(block, x, c, mask, context, context_mask, use_reentrant=False)
            else:
                x = block(x, c, mask, context, context_mask)
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
#        ADM (UNet) with Denoising Task Routing (App. A.1, Pseudo Code 2)       #
#################################################################################


def zero_module(module):
    """Zero a module's parameters, so that the residual branch it ends starts at 0 (ADM's init); returns it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def route(h, mask):
    """m_t * h for activations h (N, C, ...) and a routing mask (N, C); h itself when routing is off."""
    return h if mask is None else h * mask.to(h.dtype).view(*mask.shape, *[1] * (h.ndim - 2))


def resample(x, how):
    """Parameter-free 2x nearest upsampling ("up"), 2x2 average pooling ("down") or identity (None)."""
    if how == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.avg_pool2d(x, kernel_size=2) if how == "down" else x


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups, computed in float32 and cast back (stable under autocast)."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution: (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(resample(x, "up"))


class ResBlock(nn.Module):
    """ADM residual block, routed by Eq. (3): z' = skip(z) + Block(m_t * SiLU(GN(z))) (Pseudo Code 2).

    Routed branch: out_layers(emb, conv(resample(m_t * SiLU(GN(z))))); skip path: skip_connection(resample(z)),
    unmasked. The mask has the block's input width; a masked channel still enters GN's statistics, never the conv."""

    def __init__(
        self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False, updown=None
    ):  # "up" / "down": resample both paths 2x (resblock_updown), None: keep the size
        super().__init__()
        out_channels = out_channels or channels
        self.channels, self.updown, self.use_scale_shift_norm = channels, updown, use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (1 + use_scale_shift_norm)))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb, mask=None):
        """x (N, C, H, W), embedding emb (N, E), routing mask (N, C) or None -> (N, C_out, H', W')."""
        # The mask follows GroupNorm (App. A.1), so GN's statistics still see every channel of z: an inactive channel
        # can shift the normalisation of active channels in its group, but never enters the conv itself.
        norm_act, conv = self.in_layers[:2], self.in_layers[2]  # guided-diffusion's layout: [GN, SiLU, conv]
        h = norm_act(x)
        # A channel mask commutes with resampling (it is constant over space): apply it on the smaller side.
        h = route(resample(h, "down"), mask) if self.updown == "down" else resample(route(h, mask), self.updown)
        h = conv(h)  # conv(m_t * SiLU(GN(z))): (N, C_out, H', W')
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:  # AdaGN: GN(h) * (1 + scale) + shift
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(resample(x, self.updown)) + h  # the skip path sees the unmasked z


class AttentionBlock(nn.Module):
    """Spatial self-attention block, routed like ResBlock: z' = z + proj(attn(qkv(m_t * GN(z)))) (App. A.1).

    The skip path z is unmasked; a masked channel still enters GN's statistics, never qkv."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False):
        super().__init__()
        self.channels, self.new_order = channels, use_new_attention_order
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        if channels % self.num_heads or (num_head_channels != -1 and channels % num_head_channels):
            raise InputError(f"{channels} channels cannot be split into heads ({num_heads=}, {num_head_channels=})")
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x, emb=None, mask=None):
        """x (N, C, H, W), routing mask (N, C) or None -> (N, C, H, W); emb is unused."""
        n, c, *spatial = x.shape
        z = x.reshape(n, c, -1)  # (N, C, L)
        qkv = self.qkv(route(self.norm(z), mask))  # (N, 3C, L)
        heads, d = self.num_heads, c // self.num_heads
        if self.new_order:  # [q | k | v], each cut into heads
            q, k, v = qkv.reshape(n, 3, heads, d, -1).unbind(1)  # (N, heads, d, L) each
        else:  # legacy order: cut into heads, each [q | k | v]
            q, k, v = qkv.reshape(n, heads, 3, d, -1).unbind(2)
        h = F.scaled_dot_product_attention(q.mT, k.mT, v.mT)  # softmax(q k^T / sqrt(d)) v: (N, heads, L, d)
        h = self.proj_out(h.mT.reshape(n, c, -1))
        return (z + h).reshape(n, c, *spatial)


class ADM(GuidedModel):
    """ADM UNet with task routing; parameters (and state_dict) identical to guided-diffusion's UNetModel.

    Given UNetModel's arguments (2-D only; attention_resolutions as downsample rates) the state dict matches it key for
    key and shape for shape, so guided-diffusion's checkpoints load with strict=True, and with routing="none" (the same
    as beta=1) the output equals UNetModel's. Every ResBlock and AttentionBlock of the input, middle and output blocks
    is routed, each by a mask of its input width (an output ResBlock's includes the concatenated U-Net skip). Labels
    are dropped at random (class_dropout_prob) only in training mode."""

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,  # downsample rates ds = image_size / resolution, as guided-diffusion's UNetModel
        dropout=0.0,
        channel_mult=(1, 2, 4, 8),
        num_classes=None,  # None: unconditional
        num_heads=1,
        num_head_channels=-1,  # if set, overrides num_heads with channels / num_head_channels
        num_heads_upsample=-1,  # heads of the output blocks' attention; -1: num_heads
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        use_checkpoint=False,  # gradient checkpointing of every routed block
        class_dropout_prob=0.0,  # > 0 adds a null-class row (index num_classes) for classifier-free guidance
        routing="dtr",
        alpha=4.0,
        beta=0.8,
        num_tasks=1000,  # = diffusion steps T
        routing_seed=0,  # only R-TR masks are random
    ):
        super().__init__()
        self.input_size = self.image_size = image_size  # input_size: the registry-wide name (as DiT's)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels, self.num_classes, self.class_dropout_prob = model_channels, num_classes, class_dropout_prob
        self.use_checkpoint = use_checkpoint
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + (class_dropout_prob > 0), emb)

        res = lambda cin, cout, updown=None: ResBlock(cin, emb, dropout, cout, use_scale_shift_norm, updown)
        attn = lambda c, heads: AttentionBlock(c, heads, num_head_channels, use_new_attention_order)
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1  # channels of every input block's output; current downsample rate
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers, ch = [res(ch, int(mult * model_channels))], int(mult * model_channels)
                layers += [attn(ch, num_heads)] if ds in attention_resolutions else []
                self.input_blocks.append(nn.Sequential(*layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(nn.Sequential(res(ch, ch, "down") if resblock_updown else Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers, ch = [res(ch + skips.pop(), int(mult * model_channels))], int(mult * model_channels)
                layers += [attn(ch, heads_up)] if ds in attention_resolutions else []
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, "up") if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))
        # One mask per routed block, of its input width (what its GroupNorm normalizes), in forward order.
        widths = [m.channels for m in self.modules() if isinstance(m, (ResBlock, AttentionBlock))]
        self.router = TaskRouter(widths, routing, num_tasks, alpha, beta, routing_seed)

    def labels(self, y, n, force_drop_ids=None):
        """Labels (N,) to embed: y, with training-time drops to the null class; y=None is all-null."""
        if y is None:
            if self.class_dropout_prob == 0:
                raise InputError("a class-conditional ADM needs labels y (it has no null class without label dropout)")
            return torch.full((n,), self.num_classes, dtype=torch.long, device=self.label_emb.weight.device)
        return drop_labels(y, self.num_classes, self.class_dropout_prob if self.training else 0.0, force_drop_ids)

    def run(self, blocks, h, emb, masks):
        """Apply one UNet stage; every ResBlock / AttentionBlock takes the next mask from the iterator `masks`."""
        for layer in blocks:
            if not isinstance(layer, (ResBlock, AttentionBlock)):
                h = layer(h)
            elif self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, h, emb, next(masks), use_reentrant=False)
            else:
                h = layer(h, emb, next(masks))
        return h

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x (N, C, H, W), integer timesteps t (N,), labels y (N,) (ignored if unconditional) -> (N, C_out, H, W)."""
        masks = iter(self.router(t, x.dtype))  # looked up once, handed to the blocks in order
        emb = self.time_embed(timestep_embedding(t, self.model_channels))  # (N, 4 * model_channels)
        if self.num_classes is not None:
            emb = emb + self.label_emb(self.labels(y, x.shape[0], force_drop_ids))
        hs, h = [], x
        for blocks in self.input_blocks:
            h = self.run(blocks, h, emb, masks)
            hs.append(h)
        h = self.run(self.middle_block, h, emb, masks)
        for blocks in self.output_blocks:
            h = self.run(blocks, torch.cat([h, hs.pop()], dim=1), emb, masks)  # U-Net skip: channel concat
        return self.out(h)


def _adm(default_classes, **cfg):
    """Registry entry: DiT_models' keywords (input_size, in_channels, num_classes, learn_sigma, ...) -> ADM."""

    def make(input_size=64, in_channels=3, num_classes=default_classes, learn_sigma=True, **kw):
        num_classes = None if num_classes in (None, 1) else num_classes  # 1 class = unconditional, as for DiT
        return ADM(
            image_size=input_size,
            in_channels=in_channels,
            out_channels=in_channels * (1 + learn_sigma),
            num_classes=num_classes,
            **{**cfg, **kw},
        )

    return make


ADM_models = {
    # guided-diffusion's ImageNet 64x64 model (Dhariwal & Nichol, Tab. 15): attention at 32, 16, 8 (ds 2, 4, 8)
    "ADM-64": _adm(
        1000,
        model_channels=192,
        num_res_blocks=3,
        channel_mult=(1, 2, 3, 4),
        attention_resolutions=(2, 4, 8),
        num_head_channels=64,
        dropout=0.1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=True,
    ),
    # The DTR paper states no FFHQ 64x64 ADM setting (and released no ADM code). We take the default of P2 weighting's
    # code (Choi et al., 2022), the guided-diffusion fork DTR cites for its loss-weighting runs: a "lightweight ADM" for
    # unconditional FFHQ with 128 channels, 1 res block, attention at 16x16 (ds 4 here), 64-channel heads,
    # resblock_updown, AdaGN and no dropout; at 64x64 with guided-diffusion's channel_mult (1, 2, 3, 4) for that size.
    "ADM-FFHQ-64": _adm(
        None,
        model_channels=128,
        num_res_blocks=1,
        channel_mult=(1, 2, 3, 4),
        attention_resolutions=(4,),
        num_head_channels=64,
        dropout=0.0,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
    # tiny: tests and the CPU demo (attention at ds 2, i.e. 16x16 for 32x32 inputs)
    "ADM-T": _adm(
        None,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=True,
    ),
}

MODELS = {**DiT_models, **ADM_models}  # every name create_model, train.py and the bench accept


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
    raise InputError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_timesteps, section_counts):
    """Timesteps kept by respacing: '250' -> 250 evenly spaced steps of T; '10,15' -> per-section counts; 'ddimN'."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = int(section_counts[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return set(range(0, num_timesteps, stride))
        raise InputError(f"cannot create exactly {count} steps with an integer stride")
    if isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (i < extra)
        if size < count:
            raise InputError(f"cannot divide a section of {size} steps into {count}")
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


def extract(table, t, ndim=4):
    """A schedule table (T,) at timesteps t (N,), as float32 (N, 1, ..., 1) to broadcast against ndim-D tensors.

    A float32 table already on t's device (GaussianDiffusion.tables) costs one gather and no copy."""
    return table.to(t.device)[t].float().reshape(-1, *[1] * (ndim - 1))


def randn(shape, generators=None, device=None, out=None):
    """Standard normal (N, ...) noise; with one torch.Generator per sample, sample i's noise depends on its own alone.

    out: a tensor of `shape` (on the generators' device) to fill in place instead of allocating one."""
    if out is not None:
        if generators is None:
            return out.normal_()
        for g, row in zip(generators, out):  # each row is a view: drawn as torch.randn(shape[1:], generator=g)
            torch.randn(shape[1:], generator=g, out=row)
        return out
    if generators is None:
        return torch.randn(shape, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generators]).to(device)


class GaussianDiffusion:
    """Forward process, hybrid loss and DDPM / DDIM samplers over a (possibly respaced) beta schedule."""

    LOSS_WEIGHTS = ("constant", "min-snr", "p2")

    def __init__(
        self,
        betas,
        timestep_map=None,
        learn_sigma=True,
        sigma_small=False,
        predict_xstart=False,
        loss_weight="constant",
        min_snr_gamma=5.0,
        p2_gamma=1.0,
        p2_k=1.0,
    ):
        if loss_weight not in self.LOSS_WEIGHTS:
            raise InputError(f"unknown loss weight {loss_weight!r}; choose one of {', '.join(self.LOSS_WEIGHTS)}")
        betas = np.asarray(betas, dtype=np.float64)  # schedules in float64, as guided-diffusion and DiT
        self.num_timesteps = len(betas)
        self.timestep_map = torch.as_tensor(np.arange(len(betas)) if timestep_map is None else timestep_map).long()
        self.learn_sigma, self.sigma_small, self.predict_xstart = learn_sigma, sigma_small, predict_xstart
        self.loss_weight, self.min_snr_gamma, self.p2_gamma, self.p2_k = loss_weight, min_snr_gamma, p2_gamma, p2_k

        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        # the posterior variance is 0 at t=0, so its log is clipped to the t=1 value (one step: to log beta_0, unused
        # when sampling, as no noise is added at t=0)
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
        large_var = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas
        table = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # (T,) float64
        self.betas, self.log_betas = table(betas), table(np.log(betas))
        self.alphas_cumprod, self.alphas_cumprod_prev, self.snrs = table(acp), table(acp_prev), table(acp / (1.0 - acp))
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = table(np.sqrt(acp)), table(np.sqrt(1.0 - acp))
        self.sqrt_recip_alphas_cumprod = table(np.sqrt(1.0 / acp))
        self.sqrt_recipm1_alphas_cumprod = table(np.sqrt(1.0 / acp - 1))
        self.posterior_variance, self.posterior_log_variance_clipped = table(post_var), table(post_log_var)
        self.posterior_mean_coef1 = table(betas * np.sqrt(acp_prev) / (1.0 - acp))
        self.posterior_mean_coef2 = table((1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp))
        self.fixed_large_variance, self.fixed_large_log_variance = table(large_var), table(np.log(large_var))
        self.nonzero = table(np.arange(len(betas)) > 0)  # 1 where a sampling step adds noise (t > 0)
        self._device_tables = {}  # torch.device -> the tables there, see tables()

    def tables(self, device):
        """The schedule tables above as float32, and timestep_map, on `device`: copied there once, so that a lookup
        in the sampling loop is one gather (no host-to-device copy, which syncs on CUDA, and no cast)."""
        device = torch.device(device)
        if device not in self._device_tables:
            floats = {
                k: v.to(device, torch.float32)
                for k, v in vars(self).items()
                if torch.is_tensor(v) and v.is_floating_point()
            }
            self._device_tables[device] = SimpleNamespace(**floats, timestep_map=self.timestep_map.to(device))
        return self._device_tables[device]

    def _model(self, model, x, t, model_kwargs):
        """The network always sees original timesteps (respacing maps its step index back)."""
        return model(x, self.tables(t.device).timestep_map[t], **(model_kwargs or {}))

    # -- forward process ---------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = torch.randn_like(x_start) if noise is None else noise
        tab, n = self.tables(t.device), x_start.ndim
        return (
            extract(tab.sqrt_alphas_cumprod, t, n) * x_start + extract(tab.sqrt_one_minus_alphas_cumprod, t, n) * noise
        )

    def q_posterior_mean(self, x_start, x_t, t):
        """Mean of q(x_{t-1} | x_t, x_0)."""
        tab, n = self.tables(t.device), x_t.ndim
        return extract(tab.posterior_mean_coef1, t, n) * x_start + extract(tab.posterior_mean_coef2, t, n) * x_t

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        tab, n = self.tables(t.device), x_t.ndim
        mean = self.q_posterior_mean(x_start, x_t, t)
        return mean, extract(tab.posterior_variance, t, n), extract(tab.posterior_log_variance_clipped, t, n)

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        tab, n = self.tables(t.device), x_t.ndim
        return extract(tab.sqrt_recip_alphas_cumprod, t, n) * x_t - extract(tab.sqrt_recipm1_alphas_cumprod, t, n) * eps

    def predict_eps_from_xstart(self, x_t, t, x_start):
        """Inverse of predict_xstart_from_eps."""
        tab, n = self.tables(t.device), x_t.ndim
        return (extract(tab.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / extract(
            tab.sqrt_recipm1_alphas_cumprod, t, n
        )

    # -- reverse process ---------------------------------------------------------
    def p_mean_variance(self, model, x, t, clip_denoised=False, model_kwargs=None, model_output=None):
        """p(x_{t-1} | x_t): dict of mean, log_variance, pred_xstart (all like x); the variance is exp(log_variance)."""
        out = self._model(model, x, t, model_kwargs) if model_output is None else model_output
        c, tab = x.shape[1], self.tables(t.device)
        if self.learn_sigma:  # learned range: v in [-1, 1] interpolates log beta_t and log beta~_t (IDDPM)
            out, v = out.split(c, dim=1)
            frac = (v + 1) / 2
            log_var = frac * extract(tab.log_betas, t, x.ndim) + (1 - frac) * extract(
                tab.posterior_log_variance_clipped, t, x.ndim
            )
        else:  # fixed: beta~_t (small) or beta_t with beta~_1 at t = 0 (large)
            table = tab.posterior_log_variance_clipped if self.sigma_small else tab.fixed_large_log_variance
            log_var = extract(table, t, x.ndim).expand_as(x)
        x0 = out if self.predict_xstart else self.predict_xstart_from_eps(x, t, out)
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        return {"mean": self.q_posterior_mean(x0, x, t), "log_variance": log_var, "pred_xstart": x0}

    def p_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, noise=None):
        """One ancestral DDPM step x_t -> x_{t-1} (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        noise = torch.randn_like(x) if noise is None else noise
        nonzero = extract(self.tables(t.device).nonzero, t, x.ndim)
        return {
            "sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
            "pred_xstart": out["pred_xstart"],
        }

    def ddim_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, noise=None, eta=0.0):
        """One DDIM step (Song et al., 2021, their Eq. (12)); eta = 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        tab = self.tables(t.device)
        abar, abar_prev = extract(tab.alphas_cumprod, t, x.ndim), extract(tab.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev) if eta > 0 else 0.0
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if eta > 0:
            nonzero = extract(tab.nonzero, t, x.ndim)
            mean = mean + nonzero * sigma * (torch.randn_like(x) if noise is None else noise)
        return {"sample": mean, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None,
                      progress=False, generators=None, sampler="ddpm", eta=0.0):  # fmt: skip
        """Sample (N, C, H, W) from x_T ~ N(0, I) (or `noise`); per-sample `generators` make every draw reproducible.

        A step copies nothing between host and device (given generators on `device`) and allocates nothing beyond the
        network, the table gathers and the update's arithmetic: the timesteps and the step-noise buffer are made before
        the loop, the schedule tables once per device (tables())."""
        if generators is not None and len(generators) != shape[0]:
            raise InputError(f"{len(generators)} generators for a batch of {shape[0]}: pass one per sample")
        if sampler not in ("ddpm", "ddim"):
            raise InputError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
        device = device if device is not None else noise.device if noise is not None else "cpu"
        x = randn(shape, generators, device) if noise is None else noise.to(device)
        timesteps = torch.arange(self.num_timesteps - 1, -1, -1, device=device)[:, None].repeat(1, shape[0])  # (T, N)
        # Step noise, refilled in place; with per-sample generators it is drawn on their device, then moved (a no-op
        # when that is `device`). DDIM with eta = 0 never uses it.
        stochastic = sampler == "ddpm" or eta > 0
        z = torch.empty(shape, device=generators[0].device if generators else device) if stochastic else None
        steps = timesteps.unbind(0)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, leave=False)
        for t in steps:
            step_noise = randn(shape, generators, out=z).to(device) if stochastic else None
            if sampler == "ddpm":
                x = self.p_sample(model, x, t, clip_denoised, model_kwargs, step_noise)["sample"]
            else:
                x = self.ddim_sample(model, x, t, clip_denoised, model_kwargs, step_noise, eta)["sample"]
        return x

    # -- training ----------------------------------------------------------------
    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t (N,), float32."""
        return extract(self.tables(t.device).snrs, t, 1)

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
        mse = self.mse_weight(t) * mean_flat((target - eps_or_x0) ** 2)  # Eq. (1), weighted
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    learn_sigma=True,
    sigma_small=False,
    predict_xstart=False,
    diffusion_steps=1000,
    **loss_kw,
):
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
    """Timesteps (N,): uniform, or stratified so that sample i falls in cluster i mod K (uniform within it)."""
    if num_clusters is None:
        return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)
    if batch_size % num_clusters:
        raise InputError(f"batch size {batch_size} is not divisible by the number of timestep clusters {num_clusters}")
    # Interleaved (the official code concatenates cluster blocks), so every K consecutive samples -- e.g. each
    # rank's share of a global batch -- hold one timestep per cluster.
    lo, hi = torch.tensor(timestep_clusters(num_clusters, num_timesteps), device=device).T
    k = torch.arange(batch_size, device=device) % num_clusters
    u = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
    return lo[k] + (u * (hi - lo)[k]).long()


def uncertainty_weighted_loss(loss, t, log_vars, num_timesteps):
    """sum_k 0.5 * (exp(-s_k) * L_k + s_k) with L_k the mean loss of cluster k over K (Kendall et al.; ANT-UW)."""
    weights, prior = uncertainty_weights(t, log_vars, num_timesteps)
    return (weights * loss).sum() + prior


def uncertainty_weights(t, log_vars, num_timesteps):
    """ANT-UW as weights (N,) and a constant: loss = (weights * losses).sum() + constant, so any split of the batch
    into parts adds up to the batch's loss (weight 0.5 exp(-s_k) / (K n_k) for a sample of cluster k, seen n_k
    times; constant: 0.5 s_k summed over the clusters seen)."""
    k = len(log_vars)
    idx = cluster_index(t, k, num_timesteps)
    counts = torch.bincount(idx, minlength=k)
    seen = counts > 0  # with stratified sampling every cluster is seen
    per_cluster = 0.5 * torch.exp(-log_vars) / (counts.clamp(min=1) * k)  # (K,)
    return per_cluster[idx], 0.5 * log_vars[seen].sum()


#################################################################################
#            Runs: model arguments, checkpoints and sampling with CFG           #
#################################################################################

# What defines the network and its diffusion: saved in every checkpoint as "model_args" (the text_* entries are None
# for class-conditional models), compared on resume, and all sample.py needs to rebuild the model.
MODEL_ARGS = (
    "model",
    "image_size",
    "vae",
    "num_classes",
    "learn_sigma",
    "class_dropout_prob",
    "routing",
    "alpha",
    "beta",
    "routing_seed",
    "num_timesteps",
    "noise_schedule",
    "context_dim",
    "text_digest",
    "text_length",
    "text_mask",
)
MASK_KEY = ".routing._unit_mapping"  # the official DTR code stores each block's masks in its state dict
VAE_SCALE = 0.18215  # Stable Diffusion's latent scale
VAE_FACTOR = 8  # the VAE's spatial downsampling


def latent_size(model_args):
    """Side of the network's input: the image side, or the VAE latent side."""
    return model_args["image_size"] // VAE_FACTOR if model_args["vae"] else model_args["image_size"]


def build_model(model_args, **kwargs):
    """The network `model_args` describe (text-to-image when context_dim is set); kwargs: e.g. use_checkpoint."""
    m = model_args
    if m["context_dim"] is not None and m["model"] not in DiT_models:
        raise InputError(f"text-to-image needs a DiT model, not {m['model']}")
    text = {} if m["context_dim"] is None else {"context_dim": m["context_dim"]}
    return create_model(
        m["model"],
        input_size=latent_size(m),
        in_channels=4 if m["vae"] else 3,
        num_classes=m["num_classes"],
        learn_sigma=m["learn_sigma"],
        class_dropout_prob=m["class_dropout_prob"],
        routing=m["routing"],
        alpha=m["alpha"],
        beta=m["beta"],
        num_tasks=m["num_timesteps"],
        routing_seed=m["routing_seed"],
        **text,
        **kwargs,
    )


def build_diffusion(model_args, respacing="", **loss_kw):
    """The diffusion `model_args` describe, respaced to `respacing` ('' = all T steps); loss_kw: its loss weight."""
    return create_diffusion(
        respacing,
        noise_schedule=model_args["noise_schedule"],
        learn_sigma=model_args["learn_sigma"],
        diffusion_steps=model_args["num_timesteps"],
        **loss_kw,
    )


def unwrap_state_dict(sd):
    """A model state dict without the prefixes DDP (module.) and torch.compile (_orig_mod.) add to its keys."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


ZIP_MAGIC = b"PK\x03\x04"  # how a zip file, and so torch.save's zip format, begins


def read_checkpoint(path):
    """The object torch.save wrote to `path`: memory-mapped in torch's zip format (an optimizer state is never read
    whole), read whole in the legacy one (_use_new_zipfile_serialization=False), which cannot be memory-mapped."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} not found")
    try:  # train.py checkpoints hold argument dicts and RNG states, not only tensors: load only files you trust
        with open(path, "rb") as f:
            zipped = f.read(4) == ZIP_MAGIC
        return torch.load(path, map_location="cpu", mmap=zipped, weights_only=False)
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "omegaconf":
            raise InputError(
                f"{path} holds the official DTR code's hydra config (an omegaconf DictConfig): pip install omegaconf"
            ) from None
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}: {first_line(e)})") from None


def model_args(args):
    """A run's model_args from its arguments (Namespace or dict): MODEL_ARGS and where the text encoder came from."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k, None)
    return {k: get(k) for k in (*MODEL_ARGS, "text_encoder")}


def checkpoint_model_args(ckpt):
    """A train.py checkpoint's model_args (None for other checkpoints); a checkpoint without model_args carries them in "args"."""
    if isinstance(ckpt.get("model_args"), dict):
        return dict(ckpt["model_args"])
    args = ckpt.get("args")
    if not (isinstance(args, dict) and "routing" in args):
        return None
    old = model_args(args)
    if old["num_classes"] == 1 and old["context_dim"] is None:  # they recorded the flag, but dropped no labels
        old["class_dropout_prob"] = 0.0
    return old


def make_labels(num_classes, num_samples, seed, class_labels=None):
    """Labels (N,) int64: class_labels repeated (sample i gets class_labels[i % len]), or uniform from `seed`."""
    if class_labels:
        return np.resize(np.asarray(class_labels, dtype=np.int64), num_samples)
    # One stream for all N: label i never depends on the split, and a run's labels start a longer run's.
    return np.random.default_rng(seed).integers(0, num_classes, num_samples, dtype=np.int64)


def to_uint8(x):
    """Images in [-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), quantised as clamp(127.5 x + 128, 0, 255) like DiT.

    Truncation after +128 rounds x to the nearest of 256 levels (guided-diffusion truncates 127.5 (x + 1): half a
    level darker on average)."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(
    model,
    diffusion,
    labels,
    seeds,
    *,
    cfg_scale=1.0,
    guided_channels=None,
    vae=None,
    device="cpu",
    sampler="ddpm",
    eta=0.0,
    progress=False,
    context_mask=None,
):
    """uint8 images (N, H, W, 3): sample i depends only on seeds[i] (and labels[i]), never on the batch it is in.

    Sample i draws its initial noise and every step's noise from its own generator seeded with seeds[i]. labels: class
    labels (N,), text tokens (N, L, C) (with an optional key mask context_mask (N, L)), or None. Pixel models clip the
    predicted x0 to [-1, 1] at every step (as guided-diffusion); latent models do not (as DiT)."""
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    shape = (len(seeds), model.in_channels, model.input_size, model.input_size)
    cond = {"y": None if labels is None else torch.as_tensor(labels, device=device)}
    if context_mask is not None:
        cond["context_mask"] = torch.as_tensor(context_mask, device=device)
    net = model
    if labels is not None and cfg_scale != 1.0:  # classifier-free guidance: [cond | uncond] as one batch, in which

        def net(x, t, **cond):  # the model drops the second half's condition itself (null class or null context)
            both = {k: torch.cat([v, v]) for k, v in cond.items()}
            return model.forward_with_cfg(
                torch.cat([x, x]), torch.cat([t, t]), cfg_scale=cfg_scale, guided_channels=guided_channels, **both
            )[: len(x)]

    x = diffusion.p_sample_loop(
        net,
        shape,
        model_kwargs=cond,
        device=device,
        progress=progress,
        generators=gens,
        sampler=sampler,
        eta=eta,
        clip_denoised=vae is None,
    )  # pixels: clip x0 as ADM does
    if vae is not None:
        x = vae.decode(x / VAE_SCALE).sample
    return to_uint8(x)


#################################################################################
#         Latent space and text: Stable Diffusion's VAE, CLIP (optional)        #
#################################################################################

COCO_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # CLIP ViT-L/14's text encoder: 77 tokens of width 768
DEMO_TEXT_ENCODER = "builtin:tiny-clip"  # tiny_clip() below: random, offline, deterministic


def load_vae(kind, path=None, device="cpu"):
    """Stable Diffusion's AutoencoderKL (sd-vae-ft-ema / -mse), from a local path or the hub; diffusers is optional."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise InputError("--vae needs the optional package diffusers: pip install diffusers")
    if path is not None and not os.path.isdir(path):
        raise InputError(
            f"cannot load the VAE from {path!r}: not a directory (an AutoencoderKL saved with save_pretrained)"
        )
    source = path or f"stabilityai/sd-vae-ft-{kind}"
    try:
        return AutoencoderKL.from_pretrained(source).to(device).eval().requires_grad_(False)
    except Exception as e:  # offline, missing or broken files
        raise InputError(
            f"cannot load the VAE from {source!r} ({type(e).__name__}); pass --vae-path DIR with a local copy"
        )


def tiny_clip(seed=0):
    """(tokenizer, model): a 2-layer, 64-wide CLIP text encoder with random weights and a character-level tokenizer.

    Built offline and deterministically from `seed` (the global RNG is left alone): the text demo's encoder, and
    a stand-in for CLIP in tests. Random, it knows no language, but it maps different captions to different tokens."""
    import tempfile
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]  # printable ASCII is its own byte-level symbol; spaces split words
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    with tempfile.TemporaryDirectory() as d:  # no merges: every word is spelled out character by character
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer.from_pretrained(d, model_max_length=32)
    width = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    tokens = dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPTextConfig(**width, **tokens)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: seed its generator alone, leave CUDA's as it is
        torch.default_generator.manual_seed(seed)
        return tokenizer, CLIPTextModel(config)


def load_clip(name):
    """(tokenizer, model) of a CLIP text encoder: a save_pretrained directory, a hub name, or DEMO_TEXT_ENCODER."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise InputError("text-to-image needs the optional package transformers: pip install transformers")
    if name == DEMO_TEXT_ENCODER:
        return tiny_clip()
    try:
        return CLIPTokenizer.from_pretrained(name), CLIPTextModel.from_pretrained(name)
    except Exception as e:  # offline, missing or broken files
        raise InputError(
            f"cannot load a CLIP text encoder from {name!r} ({type(e).__name__}); pass --text-encoder DIR, "
            f"a local copy (tokenizer and CLIPTextModel saved with save_pretrained)"
        )


def weights_digest(module, extra=b""):
    """A short hash of `extra` and every weight of `module`: which network (a text encoder, a VAE) made something."""
    h = hashlib.sha256(extra)
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def text_digest(tokenizer, model, length):
    """The text encoder's identity: its tokenizer's vocabulary, the sequence length and every weight."""
    return weights_digest(model, json.dumps([tokenizer.get_vocab(), length], sort_keys=True).encode())


class TextEncoder:
    """Captions -> (token embeddings (N, L, C) float32, key mask (N, L) bool): CLIP's frozen last hidden state.

    Captions are padded (or cut) to the encoder's full length L (77 for CLIP), so a caption's tokens never depend on
    the others in its batch; the mask marks the real tokens (start, words, end) for models trained with --text-mask.
    The encoder runs frozen in float32 (eval, no gradients). Its digest (tokenizer vocabulary, length, weights) is saved
    in checkpoints as text_digest, so --resume and sample.py refuse any other encoder.

    With a cache folder (--cache-text DIR), each distinct caption's embedding and mask are written once, atomically
    (any rank may write), to DIR/ab/<sha256 of the digest and the caption>.pt, and read back afterwards: the cache
    holds exactly what the encoder gave, so a run from it trains bit for bit as the run that filled it."""

    def __init__(self, name, device="cpu", cache=None):
        self.tokenizer, model = load_clip(name)
        self.model = model.to(device).eval().requires_grad_(False)
        self.length = min(self.tokenizer.model_max_length, model.config.max_position_embeddings)
        self.dim, self.device, self.cache = model.config.hidden_size, device, cache
        self.digest = text_digest(self.tokenizer, model, self.length)

    @torch.no_grad()
    def encode(self, captions):
        """Run the encoder on a list of captions."""
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        hidden = self.model(input_ids=tokens.input_ids.to(self.device)).last_hidden_state.float()
        return hidden, tokens.attention_mask.to(self.device).bool()

    def cache_file(self, caption):
        """DIR/ab/abcdef....pt: named by the encoder and the caption."""
        key = hashlib.sha256(f"{self.digest}\n{caption}".encode()).hexdigest()
        return os.path.join(self.cache, key[:2], f"{key}.pt")

    def __call__(self, captions):
        """Embeddings and key masks of a list of captions, from the cache where it has them."""
        if self.cache is None:
            return self.encode(captions)
        found = {}
        new = [c for c in dict.fromkeys(captions) if not os.path.exists(self.cache_file(c))]
        if new:
            hidden, mask = self.encode(new)
            for c, h, m in zip(new, hidden.cpu(), mask.cpu()):
                found[c] = entry = {"hidden": h.clone(), "mask": m.clone()}  # clones: save the row, not the batch
                os.makedirs(os.path.dirname(self.cache_file(c)), exist_ok=True)
                atomic_write(self.cache_file(c), lambda tmp: torch.save(entry, tmp))
        for c in captions:
            if c not in found:
                found[c] = torch.load(self.cache_file(c), map_location="cpu", weights_only=True)
        hidden = torch.stack([found[c]["hidden"] for c in captions]).to(self.device)
        return hidden, torch.stack([found[c]["mask"] for c in captions]).to(self.device)


def read_coco_captions(path):
    """[(file_name, [captions])] from a COCO captions_*.json, in the order of its images (those without captions left
    out); InputError with a one-line reason for anything else.

    COCO's own format: "images" [{"id", "file_name"}] (file_name relative to the image folder) and "annotations"
    [{"image_id", "caption"}] (about 5 per image; whitespace normalised). A repeated image id, an annotation naming an
    unknown image, an empty caption or a malformed entry is refused."""
    try:
        with open(path) as f:
            coco = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read captions {path} ({type(e).__name__}: {first_line(e)})") from None
    if not (
        isinstance(coco, dict) and isinstance(coco.get("images"), list) and isinstance(coco.get("annotations"), list)
    ):
        raise InputError(f"{path} is not a COCO captions file: it needs lists 'images' and 'annotations'")
    names, captions = {}, {}
    for j, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise InputError(f"{path}: images[{j}] needs an 'id' and a 'file_name'")
        if image["id"] in names:
            raise InputError(f"{path}: images[{j}] repeats image id {image['id']!r}")
        names[image["id"]] = image["file_name"]
    for j, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise InputError(f"{path}: annotations[{j}] needs an 'image_id' and a 'caption' string")
        if ann["image_id"] not in names:
            raise InputError(f"{path}: annotations[{j}] names image {ann['image_id']!r}, which is not among the images")
        caption = " ".join(ann["caption"].split())  # COCO captions carry stray spaces and newlines
        if not caption:
            raise InputError(f"{path}: annotations[{j}] has an empty caption")
        captions.setdefault(ann["image_id"], []).append(caption)
    if not captions:
        raise InputError(f"{path} holds no captions")
    return [(name, captions[i]) for i, name in names.items() if i in captions]


#################################################################################
#              Processes and files: torchrun, atomic writes, errors             #
#################################################################################


def setup_distributed(timeout=None, device=None):
    """(rank, world_size, device) from the torchrun environment; one process without it. device: e.g. "cpu" to stay
    off the GPU (default: CUDA when present, this rank's by LOCAL_RANK); timeout: of collectives."""
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ["LOCAL_RANK"])  # the device follows the local rank, never the global one
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **({} if timeout is None else {"timeout": timeout}))
    return dist.get_rank(), dist.get_world_size(), device


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


def open_image(path):
    """An image file as an RGB PIL image; one line naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise InputError(f"cannot read image {path}: {e}") from None


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def memmap_npz(path, name="arr_0"):
    """Member `name` of an .npz, memory-mapped read-only (np.load's mmap_mode has no effect on an .npz), so ranks
    and loader workers share the page cache; None when it is stored compressed (np.savez_compressed)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with zf.open(info) as f:
            shape, fortran, dtype = NPY_HEADER_READERS[np.lib.format.read_magic(f)](f)
            npy_header = f.tell()
    with open(path, "rb") as f:  # the member's data follows its local zip header (30 bytes, name, extra field)
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    if math.prod(shape) == 0:  # mmap cannot map zero bytes
        return np.empty(shape, dtype)
    offset = info.header_offset + 30 + name_len + extra_len + npy_header
    return np.memmap(path, dtype, "r", offset, shape, order="F" if fortran else "C")


def save_npz(path, arrays):
    """np.savez to `path` atomically (through an open file, so numpy adds no '.npz' to the temporary name)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def write_text(path, text):
    """Write a str to a file (closed before returning, so an atomic_write rename sees all of it)."""
    with open(path, "w") as f:
        f.write(text)


def first_line(e):
    """An exception's message cut to its first line ('' if it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def exit_one_line(script, msg):
    """Exit with status 1 after one line on stderr, printed by rank 0 alone under torchrun: for errors in the command
    line, which every rank reads alike (see one_line_errors)."""
    raise SystemExit(f"{script}: error: {msg}" if os.environ.get("RANK", "0") == "0" else 1)


class SharedError(InputError):
    """An InputError every rank raises alike (shared_errors, or a check on values a collective made equal): rank 0
    alone reports it."""


@contextlib.contextmanager
def shared_errors():
    """Run the block on every rank, then share its InputErrors: if any rank met one, every rank raises the lowest such
    rank's as a SharedError (its message prefixed 'rank N: ' unless N is 0), so none waits for a rank that stopped.

    Every rank must enter the block, and the block must run no collective (a failing rank would skip it); joining the
    process group (setup_distributed) may open it, since no rank can fail before that. In one process, or before the
    process group exists, the error is raised as it is."""
    error = None
    try:
        yield
    except SharedError:  # already the same on every rank
        raise
    except InputError as e:
        error = e
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else str(error))
    for r, e in enumerate(errors):
        if e is not None:
            raise SharedError(e if r == 0 else f"rank {r}: {e}")


def from_rank0(fn, rank, world):
    """fn() computed on rank 0 alone and handed to every rank; if it fails there, every rank stops
    (shared_errors)."""
    with shared_errors():
        result = fn() if rank == 0 else None
    if world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def exit_now(status):
    """End this process at once, after flushing stdout and stderr: no exit hook, destructor or process-group teardown
    runs that could wait for a rank blocked in a collective."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextlib.contextmanager
def one_line_errors(script):
    """Each script's main() runs in this. Who prints what, and how the processes end:

    - One process (WORLD_SIZE unset or 1): an InputError is one line `script: error: MSG` on stderr and exit status 1
      (SystemExit); any other exception propagates (its traceback, status 1).
    - Under torchrun with 2 or more ranks, a rank that stops prints on stderr, then ends at once with status 1
      (exit_now); torchrun's agent then stops the ranks still running and exits 1:
      - a SharedError (shared_errors): rank 0 prints `script: error: MSG` (MSG names the rank the error came from
        unless rank 0); the other ranks print nothing;
      - an InputError before the process group exists (the scripts then check only their command line, alike on
        every rank): rank 0 prints `script: error: MSG`; the other ranks print nothing;
      - any other InputError (e.g. an image only this rank reads): `script: error: rank N: MSG`, from rank N;
      - any other exception (e.g. out of memory): its traceback, from the rank where it happened (torch prefixes
        each line with [rankN]).
      A rank that was waiting in a collective for the one that stopped may report that collective's failure (gloo:
      'Connection closed by peer') before torchrun stops it."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        yield
    except InputError as e:
        if world == 1 or not (isinstance(e, SharedError) or dist.is_initialized()):
            exit_one_line(script, e)
        if not isinstance(e, SharedError):
            print(f"{script}: error: rank {rank}: {e}", file=sys.stderr)
        elif rank == 0:
            print(f"{script}: error: {e}", file=sys.stderr)
        exit_now(1)
    except Exception:
        if world == 1:
            raise
        sys.excepthook(*sys.exc_info())
        exit_now(1)


#################################################################################
#                        Command line: mask pictures and benchmark              #
#################################################################################

BENCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # bench --precision
BENCH_EMA_DECAY = 0.9999  # the paper's EMA, for bench --mode train
BENCH_CI_LEVEL = 0.95  # the confidence of the interval bench prints around each kind's median cost
H100_BF16_DENSE_TFLOPS = 989.0  # bench --peak-tflops: NVIDIA H100 SXM, bf16 tensor cores without sparsity
PLOT_COLUMNS, PLOT_PANEL_INCHES, PLOT_DPI = 3, (5, 4), 100  # plot: panels per row, each panel's size
PLOT_MIN_WIDTH = 1000  # plot: pixels, however few panels
PLOT_SMOOTHING = 0.9  # plot: weight of the loss's moving average per log record (about 10 records)


def create_model(name, **kwargs):
    """A model from the registries by name, e.g. create_model('DiT-S/2', input_size=32, routing='dtr')."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def draw_masks(masks):
    """(T, C) 0/1 masks -> (3, T, C) image, active channels yellow and inactive purple as in the paper's Fig. 2."""
    on, off = torch.tensor([253, 231, 37]) / 255, torch.tensor([68, 1, 84]) / 255  # viridis' ends
    return masks[None] * on[:, None, None] + (1 - masks[None]) * off[:, None, None]


def masks_main(args):
    """Save the routing-mask table as a PNG: one row per task t (top: t = 0), one column per channel."""
    from torchvision.utils import save_image

    m = routing_masks(args.kind, args.tasks, args.channels, args.alpha, args.beta, args.seed)
    atomic_write(args.out, lambda tmp: save_image(draw_masks(m), tmp, format="png"))
    print(
        f"wrote {args.out}: {args.kind} masks, {args.tasks} tasks x {args.channels} channels, "
        f"{int(m[0].sum())} active in row 0"
    )


def dit_gmacs(model):
    """Multiply-accumulates (x 1e9) of one image's forward through a class-conditional DiT: DiT's "Gflops" (Tab. 4)."""
    d, tokens, patch = model.pos_embed.shape[-1], model.x_embedder.num_patches, model.patch_size
    block = model.blocks[0]
    per_block = (
        4 * tokens * d * d  # qkv and output projections
        + 2 * tokens * d * block.mlp.fc1.out_features  # MLP
        + 2 * tokens * tokens * d  # q k^T and attention-weighted values
        + d * block.adaLN_modulation[-1].out_features
    )  # adaLN, once per image
    embed = tokens * patch * patch * model.in_channels * d + model.t_embedder.mlp[0].in_features * d + d * d
    final = d * 2 * d + tokens * d * patch * patch * model.out_channels
    return (len(model.blocks) * per_block + embed + final) / 1e9


def median_interval(values, level=0.95):
    """Distribution-free confidence interval of the median: the order statistics x_(j) and x_(n+1-j) for the largest j
    whose coverage 1 - 2 P(Binomial(n, 1/2) < j) is at least level; None when even (min, max) falls short."""
    xs, n = sorted(values), len(values)
    j, below = 0, 0.0  # below = P(Binomial(n, 1/2) < j)
    while 1 - 2 * (below + math.comb(n, j) / 2**n) >= level:
        below += math.comb(n, j) / 2**n
        j += 1
    return (xs[j - 1], xs[n - j]) if j else None


def peak_memory(device):
    """Peak bytes so far: CUDA's allocated memory (reset before every step by the bench), or on CPU the process'
    peak resident set (all models and steps together)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 2**10  # Linux reports KiB


def bench_main(args):
    """Median step time per routing kind (forward+backward, or a full training step), interleaved so that drift hits
    all kinds alike; a kind's cost is its median step-time ratio to the first kind's over the repetitions, with a
    distribution-free confidence interval of that median (at BENCH_CI_LEVEL).

    All kinds run one network (the same weights at the same addresses), whose TaskRouter is swapped before each step:
    separately allocated copies differed in speed by up to 0.5 % on a CPU, as much as DTR's cost."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.clock == "cpu" and device.type == "cuda":
        raise InputError("--clock cpu times the host only; on CUDA use --clock wall")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # fp32 matmuls and convolutions in TF32, as train.py and facebookresearch/DiT run them
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    kinds = list(dict.fromkeys(args.routings))
    routing = {k: k.removesuffix("-plain") for k in kinds}  # KIND-plain: DiTBlock(fused=False)
    ref = create_model(args.model, input_size=args.image_size, routing=routing[kinds[0]]).to(device)
    if not isinstance(ref, DiT) and any(k.endswith("-plain") for k in kinds):
        raise InputError(f"{args.model} has no fused form: the -plain routing kinds are DiT's only")
    if args.weights == "random":  # non-identity blocks, as in a trained network (adaLN-Zero makes them identities)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0, 0.02)
    r = ref.router
    routers = {k: TaskRouter(r.widths, routing[k], r.num_tasks, r.alpha, r.beta, r.seed).to(device) for k in kinds}
    net = torch.compile(ref) if args.compile else ref  # one graph per router (dynamo guards on it)
    x = torch.randn(args.batch_size, ref.in_channels, args.image_size, args.image_size, device=device)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    y = torch.randint(0, ref.num_classes or 1, (args.batch_size,), device=device)  # ignored by unconditional ADMs
    amp = dict(device_type=device.type, dtype=BENCH_DTYPES[args.precision], enabled=args.precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    # as train.py: fused AdamW on CUDA, the paper's learning rate (the values do not change the timing)
    opt = torch.optim.AdamW(
        ref.parameters(), lr=1e-4, weight_decay=0.0, **{"fused" if device.type == "cuda" else "foreach": True}
    )
    diffusion = create_diffusion("")
    ema = [p.detach().clone() for p in ref.parameters()] if args.mode == "train" else []  # fwdbwd: no EMA copy
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(k):
        """One timed step of kind k: forward+backward of a squared output, or train.py's step (loss, AdamW, EMA)."""
        ref.router = routers[k]
        for block in ref.blocks if isinstance(ref, DiT) else ():
            block.fused = not k.endswith("-plain")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = clock()
        if args.mode == "fwdbwd":
            with torch.autocast(**amp):
                loss = net(x, t, y).float().square().mean()
            scaler.scale(loss).backward()
        else:
            with torch.autocast(**amp):
                loss = diffusion.training_losses(net, x, t, dict(y=y), noise)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            torch._foreach_lerp_(ema, [p.detach() for p in ref.parameters()], 1 - BENCH_EMA_DECAY)
        sync()
        elapsed = clock() - start
        ref.zero_grad(set_to_none=True)  # untimed; a training step has cleared and used its gradients already
        return elapsed

    times, peaks = {k: [] for k in kinds}, {k: 0 for k in kinds}
    for rep in range(args.warmup + args.steps):
        for k in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:  # rotate the order every repetition
            dt = step(k)
            if rep >= args.warmup:
                times[k].append(dt)
                peaks[k] = max(peaks[k], peak_memory(device))
    gmacs = dit_gmacs(ref) if isinstance(ref, DiT) and ref.context_dim is None else None
    print(
        f"{args.model}  input {args.image_size}x{args.image_size}  batch {args.batch_size}  {device}  "
        f"threads {torch.get_num_threads()}  {args.steps} steps  {args.mode}  {args.precision}"
        f"{'  compiled' if args.compile else ''}  clock {args.clock}  weights {args.weights}"
        f"{f'  {gmacs:.4g} GMACs/img fwd' if gmacs else ''}"
    )
    for k in kinds:
        med = statistics.median(times[k])
        row = [
            f"  {k:<9} {1000 * med:9.2f} ms/step",
            f"{args.batch_size / med:9.2f} img/s",
            f"peak {'' if device.type == 'cuda' else 'RSS '}{peaks[k] / 2**30:.2f} GiB",
        ]
        if device.type == "cuda":  # training ~ 3x the forward's FLOPs (2 per MAC): forward, and backward's two
            row.append(
                "MFU n/a"
                if gmacs is None
                else f"MFU {100 * 3 * 2 * gmacs * 1e9 * args.batch_size / med / (args.peak_tflops * 1e12):.1f}%"
            )
        if k != kinds[0]:
            # the median of per-repetition ratios: a repetition's steps run back to back, so slow drift cancels
            ratios = [a / b for a, b in zip(times[k], times[kinds[0]])]
            row.append(f"{100 * (statistics.median(ratios) - 1):+.2f}% vs {kinds[0]}")
            interval = median_interval(ratios, BENCH_CI_LEVEL)  # the median alone hides how far noise moved it
            if interval:  # None below 6 repetitions at 95 %
                lo, hi = (100 * (r - 1) for r in interval)
                row.append(f"({100 * BENCH_CI_LEVEL:g}% CI {lo:+.2f} to {hi:+.2f}%)")
        print("  ".join(row))


def read_metrics(path):
    """The records of a train.py metrics.jsonl (see train.MetricsLog), in file order; a torn last line (no newline:
    the machine stopped mid-append) is left out, any other line that is not a JSON object with a "step" is refused."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise InputError(f"{path} not found: train.py writes it in every experiment directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {first_line(e)})") from None
    records = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1]: '' after the last newline, or a torn append
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise InputError(f"{path} line {number} is not a train.py metrics record")
        records.append(record)
    return records


def smooth(values, weight=PLOT_SMOOTHING):
    """Debiased exponential moving average of a sequence (TensorBoard's smoothing): the first value is kept as is."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_run(path):
    """(label, train records, eval records) of a train.py experiment directory: its model and routing (args.json)."""
    try:
        with open(os.path.join(path, "args.json")) as f:
            args = json.load(f)
        label = f"{args['model']} {args['routing']}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: no readable args.json with model and routing ({type(e).__name__})") from None
    file = os.path.join(path, "metrics.jsonl")
    records = read_metrics(file)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not all(number(r.get("loss")) for r in train) or not all(
        isinstance(r.get("metrics"), dict) and all(map(number, r["metrics"].values())) for r in evals
    ):
        raise InputError(f"{file}: a train record without a numeric loss or an eval record without numeric metrics")
    if not train and not evals:
        raise InputError(f"{file} holds no train or eval record yet")
    return label, train, evals


def plot_main(args):
    """One PNG: the runs' smoothed training loss and every evaluated metric (metrics.jsonl) against steps, a panel
    each (PLOT_COLUMNS to a row, PLOT_PANEL_INCHES each at PLOT_DPI, at least PLOT_MIN_WIDTH pixels wide), a line per
    run labelled by its model and routing; *_std spreads are not drawn."""
    runs = [plot_run(path) for path in args.runs]
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise InputError("dtr.py plot needs matplotlib: pip install matplotlib") from None
    labels = [label for label, _, _ in runs]
    labels = [
        f"{label} ({os.path.basename(os.path.normpath(path))})" if labels.count(label) > 1 else label
        for label, path in zip(labels, args.runs)
    ]  # two runs of one model and routing: their folders tell them apart
    names = list(
        dict.fromkeys(k for _, _, evals in runs for r in evals for k in r["metrics"] if not k.endswith("_std"))
    )
    panels = ["loss"] * any(train for _, train, _ in runs) + names
    cols = min(PLOT_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = max(cols * PLOT_PANEL_INCHES[0], PLOT_MIN_WIDTH / PLOT_DPI)
    fig = Figure(figsize=(width, rows * PLOT_PANEL_INCHES[1]), dpi=PLOT_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, panel in zip(axes, panels):
        for i, ((_, train, evals), label) in enumerate(zip(runs, labels)):
            color = f"C{i}"
            if panel == "loss" and train:
                steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
                ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smooth(loss), color=color, label=label)
            points = [(r["step"], r["metrics"][panel]) for r in evals if panel in r["metrics"]]
            if points:
                ax.plot(*zip(*points), color=color, marker="o", label=label)
        ax.set(
            xlabel="training step", ylabel=f"loss (EMA {PLOT_SMOOTHING} of log records)" if panel == "loss" else panel
        )
        ax.set_title(panel)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, not 400000
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png"))
    size = fig.get_size_inches() * PLOT_DPI
    print(f"wrote {args.out}: {', '.join(panels)} of {len(runs)} run(s), {size[0]:.0f}x{size[1]:.0f} px")


def main(args):
    """Run a subcommand; bad arguments stop with one line and exit status 1."""
    with one_line_errors("dtr.py"):
        {"masks": masks_main, "bench": bench_main, "plot": plot_main}[args.command](args)


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
    p = sub.add_parser("bench", help="time forward+backward (or a training step) per routing kind: DTR's cost")
    p.add_argument("--model", choices=list(MODELS), default="DiT-S/2")
    p.add_argument("--image-size", type=int, default=32, help="the network's input side (latent side for DiT)")
    p.add_argument("--batch-size", type=int, default=8)
    # On a shared 2-core CPU single steps vary by about 1.5 %: 40 repetitions leave DTR's cost within about +-1.3 %
    # (95 % interval of the median), 150 within about +-0.5 %
    steps_help = "timed repetitions, one step of every kind each (default 150; the interval needs 6 or more)"
    p.add_argument("--steps", type=int, default=150, help=steps_help)
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (torch.compile compiles here)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--routings",
        nargs="+",
        choices=[*ROUTINGS, *(f"{k}-plain" for k in ROUTINGS if k != "none")],
        default=["none", "dtr"],
        help="kinds to time, interleaved; the first is the baseline. KIND-plain (DiT only): routed blocks computed in "
        "the plain form (1 - m) * z + DiTBlock(m * z) instead of the fused one",
    )
    p.add_argument(
        "--mode",
        choices=["fwdbwd", "train"],
        default="fwdbwd",
        help="fwdbwd: forward+backward of a squared output; train: diffusion loss, backward, AdamW, EMA",
    )
    p.add_argument("--precision", choices=list(BENCH_DTYPES), default="fp32", help="bf16 / fp16: autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    weights_help = "init: as built (adaLN-Zero: every block starts as the identity); random: all N(0, 0.02^2)"
    p.add_argument("--weights", choices=["init", "random"], default="init", help=weights_help)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process' CPU time, robust to other processes on a shared machine (CPU only)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_BF16_DENSE_TFLOPS,
        help="the device's peak, for MFU (default: H100 SXM bf16 dense)",
    )
    p = sub.add_parser(
        "plot", help="training curves of train.py runs: smoothed loss and every FID-type metric vs steps"
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="experiment directories (metrics.jsonl and args.json)")
    p.add_argument("--out", default="curves.png", help="the PNG to write (needs matplotlib)")
    main(parser.parse_args())
