"""Tests for the DTR reference implementation: CPU only, tiny configs, every test checks values.

Run: python -m pytest -q test_dtr.py
"""

import argparse
import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch.utils._python_dispatch import TorchDispatchMode

import dtr
import fid
import sample
import train

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)  # tiny models: one thread is fastest and never oversubscribes
# a tiny model's outputs (~1) are float32 sums through its layers on a residual stream of up to ~5, each rounding
# ~eps32 * 5 = 6e-7 absolute (near 0 too); another batch size, CPU kernel or op order rounds them differently, so the
# same forward computed two such ways agrees to a few of those roundings, absolutely
FORWARD_ATOL = 1e-5


#################################################################################
#                          Shared helpers and fixtures                          #
#################################################################################


def tiny_dit(**kw):
    """A 4-block DiT on 8x8 inputs with 10 classes; random (not zero) adaLN so blocks are not the identity."""
    torch.manual_seed(0)
    model = dtr.DiT_models["DiT-T/2"](input_size=8, num_classes=10, **kw)
    randomize(model)
    return model


def randomize(model, scale=0.05, seed=1, add=False):
    """Random weights, so that zero-initialised layers contribute: every trainable parameter becomes N(0, scale^2)
    noise, or with add=True gets that noise added (norms then keep their scale near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * scale
                p.add_(noise) if add else p.copy_(noise)
    return model


def reference_dtr(T, C, alpha, beta):
    """Independent pure-Python DTR masks: row t is active on [off_t, off_t + n), n = int(beta*C),
    off_t = round((t/(T-1))^a (C-n))."""
    n = int(beta * C)
    out = torch.zeros(T, C)
    for t in range(T):
        frac = t / (T - 1) if T > 1 else 0.0
        off = round(frac**alpha * (C - n))  # Python's round is half-to-even, like numpy's
        out[t, off : off + n] = 1
    return out


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize(dtr.ADM_models["ADM-T"](input_size=16, **kw).eval(), scale=0.02, seed=seed, add=True)


TINY_TRAIN = [
    "--image-size",
    "8",
    "--global-batch-size",
    "8",
    "--demo-images-per-class",
    "4",
    "--grid-steps",
    "2",
    "--log-every",
    "2",
]


CPU_RUN = train.Run(rank=0, world=1, device=torch.device("cpu"), part=slice(None))  # one process, the whole batch


def run_train(tmp_path, *extra, name="r"):
    """Train in this process; returns (experiment dir, its newest checkpoint)."""
    args = train.parser().parse_args([*TINY_TRAIN, "--results-dir", str(tmp_path / name), *extra])
    exp = train.main(args)
    return exp, torch.load(train.latest_checkpoint(str(tmp_path / name)), weights_only=False)


def torchrun(*args, script="train.py", nproc=2, timeout=600, env=None):
    """`script` under torchrun on `nproc` CPU processes (one thread each) -> the finished process; `env`: more
    environment variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*cmd, os.path.join(HERE, script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def failing_on_rank(folder, rank):
    """Environment variables that make every conv2d of process `rank` raise RuntimeError('simulated out of memory'),
    as a GPU out of memory would (a sitecustomize module in `folder`, which Python imports at start-up)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(
            "import os\n"
            f"if os.environ.get('RANK') == '{rank}':\n"
            "    import torch.nn.functional as F\n\n"
            "    def conv2d(*args, **kwargs):\n"
            "        raise RuntimeError('simulated out of memory')\n\n"
            "    F.conv2d = conv2d\n"
        )
    return {"PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}


def write_images(folder, n, size=(12, 10)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 25 * i % 256, np.uint8)).save(os.path.join(folder, f"{i}.png"))


def tiny_vae(path, seed=0):
    """A tiny random AutoencoderKL (4 latent channels, 8x down), saved with save_pretrained: a stand-in for SD's."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    vae.save_pretrained(path)
    return str(path)


SAMPLE_STEPS = 10  # DDPM steps in these tests (the default is 250)


COLOURS = torch.tensor([[0.8, -0.6, -0.6], [-0.6, 0.8, -0.6], [-0.6, -0.6, 0.8], [0.5, 0.5, -0.5]])


def ckpt_args(**kw):
    """A train.py checkpoint's model_args (dtr.MODEL_ARGS): a 4-class pixel DiT-T/2 on 8x8, label dropout, DTR."""
    model = dict(model="DiT-T/2", image_size=8, vae=None, num_classes=4, learn_sigma=True, class_dropout_prob=0.1)
    routing = dict(routing="dtr", alpha=4.0, beta=0.8, routing_seed=0, num_timesteps=1000, noise_schedule="linear")
    return dtr.model_args({**model, **routing, **kw})


def save_train_ckpt(path, args, ema, raw=None):
    """A checkpoint as train.py writes it."""
    torch.save(
        {
            "model": raw if raw is not None else ema,
            "ema": ema,
            "opt": {},
            "model_args": dtr.model_args(args),
            "args": args,
            "step": 0,
            "uw": None,
            "rng": None,
            "scaler": None,
        },
        path,
    )
    return str(path)


def run_sample(ckpt, out, *flags, n=6):
    """sample.py in this process -> the arrays of its .npz."""
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--num-samples", str(n), "--num-sampling-steps", str(SAMPLE_STEPS)]
    sample.main(sample.parser().parse_args([*argv, *flags]))
    npz = [f for f in os.listdir(out) if f.startswith("samples_")]
    with np.load(os.path.join(out, npz[0])) as z:
        return {k: z[k] for k in z.files}


def write_coco(root, captions_per_image, size=12):
    """An image folder and a COCO captions json for it."""
    os.makedirs(root / "images")
    coco = {"images": [], "annotations": []}
    for i, caps in enumerate(captions_per_image):
        Image.fromarray(np.full((size, size, 3), (40 * i) % 256, np.uint8)).save(root / "images" / f"{i:03d}.png")
        coco["images"].append({"id": 100 + i, "file_name": f"{i:03d}.png"})
        coco["annotations"] += [{"image_id": 100 + i, "caption": c} for c in caps]
    (root / "captions.json").write_text(json.dumps(coco))
    return str(root / "images"), str(root / "captions.json")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "dtr.py"), *args], capture_output=True, text=True, timeout=300
    )


#################################################################################
#                  dtr.py: routing masks (Sec. 4.2-4.3, App. F)                 #
#################################################################################


@pytest.mark.parametrize(
    "T,C,alpha,beta",
    [
        (1000, 1152, 4.0, 0.8),
        (1000, 384, 4.0, 0.8),
        (250, 64, 2.0, 0.6),
        (10, 7, 1.0, 0.5),
        (1000, 768, 0.5, 0.8),
        (2, 5, 4.0, 0.2),
    ],
)
def test_dtr_masks_match_formula(T, C, alpha, beta):
    m = dtr.dtr_masks(T, C, alpha, beta)
    assert m.shape == (T, C) and m.dtype == torch.float32
    assert torch.equal(m, reference_dtr(T, C, alpha, beta))
    n = int(beta * C)
    assert m[0, :n].all() and not m[0, n:].any()  # row 0 starts at channel 0
    assert m[-1, C - n :].all() and not m[-1, : C - n].any()  # row T-1 ends at channel C


def test_dtr_masks_edge_cases():
    assert torch.equal(dtr.dtr_masks(100, 33, 4.0, 1.0), torch.ones(100, 33))  # beta = 1: no routing
    # alpha = 1: the window start moves linearly, (C - n) * t / (T - 1)
    m = dtr.dtr_masks(11, 20, alpha=1.0, beta=0.5)
    starts = m.argmax(dim=1)
    assert starts.tolist() == [round(10 * t / 10) for t in range(11)] == list(range(11))
    # alpha = 4: the window barely moves in the first half of the timesteps (task weights favour large t)
    starts = dtr.dtr_masks(1000, 1152, 4.0, 0.8).argmax(dim=1)
    assert starts[499] == round((499 / 999) ** 4 * 231) == 14 and starts[999] == 231
    assert (starts.diff() >= 0).all()  # monotone slide


@pytest.mark.parametrize("kind", dtr.ROUTINGS)
def test_every_row_has_the_right_number_of_ones(kind):
    T, C, beta = 1000, 96, 0.8
    m = dtr.routing_masks(kind, T, C, beta=beta, seed=3)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    expected = {
        "dtr": int(beta * C),
        "random": int(beta * C),
        "cdtr": int(beta * C),
        "ercdt": C // 2 + (C - C // 2) // 8,
        "none": C,
    }[kind]
    assert (m.sum(dim=1) == expected).all()


def test_random_masks_reproducible_and_independent():
    a, b, c = (
        dtr.random_masks(50, 64, 0.8, seed=0),
        dtr.random_masks(50, 64, 0.8, seed=0),
        dtr.random_masks(50, 64, 0.8, seed=1),
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 50  # every task draws its own channels
    # expected overlap of two random rows is n^2 / C (App. B), far from the DTR neighbours' n
    overlap = (a[:-1] * a[1:]).sum(dim=1).mean().item()
    assert abs(overlap - 51 * 51 / 64) < 2.0


def test_cdtr_and_ercdt_masks_follow_the_timestep_clusters():
    T, C, K = 1000, 64, 8
    cd = dtr.routing_masks("cdtr", T, C)
    table = dtr.dtr_masks(K, C)
    for k, (lo, hi) in enumerate(dtr.timestep_clusters(K, T)):
        assert (cd[lo:hi] == table[k]).all()  # every t of a cluster shares its cluster's DTR row
    er = dtr.routing_masks("ercdt", T, C)
    assert er[:, : C // 2].all()  # half the channels serve every task
    own = [er[lo, C // 2 :] for lo, _ in dtr.timestep_clusters(K, T)]
    assert torch.equal(torch.stack(own).sum(0), torch.ones(C - C // 2))  # the rest is split among clusters
    assert torch.equal(er[124], er[0]) and not torch.equal(er[125], er[124])  # cluster edges at T/K


def test_routing_masks_reject_bad_arguments():
    with pytest.raises(ValueError, match="unknown routing kind"):
        dtr.routing_masks("DTR!", 10, 10)
    for beta in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            dtr.routing_masks("dtr", 10, 10, beta=beta)
    with pytest.raises(ValueError, match="alpha"):
        dtr.routing_masks("dtr", 10, 10, alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        dtr.DiT_models["DiT-T/2"](input_size=8, beta=2.0)


def test_task_router_tables():
    r = dtr.TaskRouter([32, 32, 64, 32], "dtr", num_tasks=100)
    assert len(list(r.buffers())) == 2 and r.state_dict() == {}  # one table per width, never saved
    t = torch.tensor([0, 99, 50])
    masks = r(t)
    assert [m.shape for m in masks] == [(3, 32), (3, 32), (3, 64), (3, 32)]
    assert torch.equal(masks[2], dtr.dtr_masks(100, 64)[t])
    rr = dtr.TaskRouter([32, 32], "random", num_tasks=100, seed=5)
    m0, m1 = rr(t)
    assert len(list(rr.buffers())) == 2 and not torch.equal(m0, m1)  # R-TR: every block draws its own
    assert torch.equal(rr(t)[1], dtr.TaskRouter([32, 32], "random", num_tasks=100, seed=5)(t)[1])
    assert dtr.TaskRouter([32], "none")(t) == [None]


#################################################################################
#                        dtr.py: DiT with DTR (App. A.1)                        #
#################################################################################


def dit_param_count(depth, D, p, heads, input_size=32, c_in=4, classes=1000, learn_sigma=True):
    """Parameters of a DiT from its architecture description (independent of the module code)."""
    c_out = 2 * c_in if learn_sigma else c_in
    embed = (p * p * c_in * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D + (input_size // p) ** 2 * D
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    final = (D * p * p * c_out + p * p * c_out) + (2 * D * D + 2 * D)
    return embed + depth * block + final


@pytest.mark.parametrize(
    "name,arch,paper_millions,exact",
    [
        ("DiT-S/2", (12, 384, 2, 6), 33, 32_963_360),
        ("DiT-B/2", (12, 768, 2, 12), 130, 130_512_416),
        ("DiT-L/2", (24, 1024, 2, 16), 458, 458_102_816),
        ("DiT-XL/2", (28, 1152, 2, 16), 675, 675_129_632),
    ],
)
def test_dit_parameter_counts(name, arch, paper_millions, exact):
    with torch.device("meta"):
        model = dtr.DiT_models[name](input_size=32, routing="none")
    n = sum(p.numel() for p in model.parameters())
    assert n == dit_param_count(*arch) == exact
    assert abs(n / 1e6 - paper_millions) < 1  # the paper rounds: 33M, 130M, 458M, 675M


def test_dit_registry_and_state_dict_layout():
    assert [k for k in dtr.DiT_models if k != "DiT-T/2"] == [
        f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)
    ]
    sd = tiny_dit(routing="dtr").state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    D = 128
    assert shapes["x_embedder.proj.weight"] == (D, 4, 2, 2) and shapes["pos_embed"] == (1, 16, D)
    assert shapes["y_embedder.embedding_table.weight"] == (11, D)  # 10 classes + the null class
    assert shapes["blocks.3.attn.qkv.weight"] == (3 * D, D) and shapes["blocks.0.mlp.fc2.weight"] == (D, 4 * D)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6 * D, D)
    assert shapes["final_layer.linear.weight"] == (2 * 2 * 8, D)
    assert len(sd) == 8 + 4 * 10 + 4 and not any("router" in k or "mask" in k for k in sd)
    assert not sd["pos_embed"].requires_grad


def test_dit_init_is_adaln_zero():
    torch.manual_seed(0)
    model = dtr.DiT_models["DiT-T/2"](input_size=8, num_classes=10)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(model(x, torch.tensor([3, 700]), torch.tensor([1, 2])), torch.zeros(2, 8, 8, 8))
    for block in model.blocks:  # each block starts as the identity, routed or not
        assert not block.adaLN_modulation[-1].weight.any()
    pe = model.pos_embed[0]  # token (row i, col j) = i*4 + j; first half of dims encodes j, second half i
    omega = 1.0 / 10000 ** (torch.arange(32, dtype=torch.float64) / 32)
    i, j = 2, 3
    expected = torch.cat(
        [torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)]
    ).float()
    assert torch.allclose(pe[i * 4 + j], expected, atol=1e-6)


def hand_dit_block(block, z, c):
    """DiTBlock(z) written out from its weights: adaLN-Zero attention then MLP (Eq. 5)."""
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    s1, g1, a1, s2, g2, a2 = mod.chunk(6, dim=1)
    heads, (n, T, D) = block.attn.num_heads, z.shape

    def ln(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)

    h = ln(z) * (1 + g1[:, None]) + s1[:, None]
    q, k, v = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).reshape(n, T, 3, heads, D // heads).unbind(2)
    att = torch.softmax(torch.einsum("nthd,nshd->nhts", q, k) / math.sqrt(D // heads), dim=-1)
    o = torch.einsum("nhts,nshd->nthd", att, v).reshape(n, T, D)
    z = z + a1[:, None] * F.linear(o, block.attn.proj.weight, block.attn.proj.bias)
    h = ln(z) * (1 + g2[:, None]) + s2[:, None]
    h = F.linear(
        F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias), approximate="tanh"),
        block.mlp.fc2.weight,
        block.mlp.fc2.bias,
    )
    return z + a2[:, None] * h


def float32_budget(exact):
    """How far a float32 result may be from its float64 reference: 32 ulps of the tensor's largest value. A block's
    forward chains about 16 roundings (norms, matmuls, softmax, GELU, gating, residual sums), each within about one ulp
    of the largest value where nothing cancels; backward chains about as many again."""
    return 32 * torch.finfo(torch.float32).eps * exact.abs().max()


@pytest.mark.parametrize("fused", [False, True])
def test_routed_dit_block_is_eq8(fused):
    block = randomize(dtr.DiTBlock(64, 4, fused=fused), scale=0.1)
    block64 = copy.deepcopy(block).double()
    z, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    m = dtr.dtr_masks(1000, 64)[torch.tensor([0, 500, 999])]  # (N, C)
    m64, z64, c64 = m[:, None].double(), z.double(), c.double()
    with torch.no_grad():
        routed = block(z, c, m).double()
        inner = hand_dit_block(block64, m64 * z64, c64)
        expected = (1 - m64) * z64 + inner  # Eq. (8), in float64 from the weights
        budget = float32_budget(expected)
        assert (routed - expected).abs().max() <= budget
        # an active channel carries the block's output alone: the (1 - m) z term vanishes there
        active = m[:, None].expand_as(z).bool()
        assert (routed[active] - inner[active]).abs().max() <= budget
        # an inactive channel only travels the identity path: perturbing it moves the output by exactly that much
        c_off = int((m[0] == 0).nonzero()[0])
        dz = torch.zeros_like(z)
        dz[0, :, c_off] = 1.0
        assert ((block(z + dz, c, m)[0].double() - routed[0]) - dz[0]).abs().max() <= 2 * budget


def weighted_sum(out):
    """A loss that sees every output, each with its own weight (a plain sum would hide swapped gradients)."""
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def official_dit_block(block, x, c, ctx=None, ctx_mask=None):
    """facebookresearch/DiT's DiTBlock.forward (x + gate * attn(...), [+ cross-attention], x + gate * mlp(...)), from
    the block's own sublayers."""
    s1, g1, a1, s2, g2, a2 = block.adaLN_modulation(c).chunk(6, dim=1)
    mod = lambda v, shift, scale: v * (1 + scale[:, None]) + shift[:, None]
    x = x + a1[:, None] * block.attn(mod(block.norm1(x), s1, g1))
    if ctx is not None:
        x = x + block.cross_attn(block.norm_cross(x), ctx, ctx_mask)
    return x + a2[:, None] * block.mlp(mod(block.norm2(x), s2, g2))


def official_routed_block(block, z, c, m, ctx=None, ctx_mask=None):
    """Eq. (8) composed as the official code does: (1 - m) * z + DiTBlock(m * z)."""
    return (1 - m[:, None]) * z + official_dit_block(block, m[:, None] * z, c, ctx, ctx_mask)


@pytest.mark.parametrize("context_dim", [None, 24])
def test_unrouted_dit_block_is_facebookresearch_dits_op_for_op(context_dim):
    # routing none runs DiT's block unchanged: the same values and gradients, bit for bit
    block = randomize(dtr.DiTBlock(64, 4, context_dim=context_dim), scale=0.1)
    z, c = torch.randn(2, 16, 64, requires_grad=True), torch.randn(2, 64)
    ctx = None if context_dim is None else torch.randn(2, 5, context_dim)

    def run(f):
        z.grad = None
        block.zero_grad(set_to_none=True)
        out = f(block, z, c, None if ctx is None else ctx)
        weighted_sum(out).backward()
        return [out.detach(), z.grad, *(p.grad for p in block.parameters())]

    ours, official = run(lambda blk, x, c, ctx: blk(x, c, None, ctx)), run(official_dit_block)
    assert all(torch.equal(a, b) for a, b in zip(ours, official))


@pytest.mark.parametrize("context_dim", [None, 24])
def test_routed_block_forms_match_the_official_composition(context_dim):
    # The plain form is Eq. (8) composed as the official code does (official_routed_block), op for op: equal bit for
    # bit. The fused form regroups the residual sums (exact for binary masks), so its outputs and all gradients differ
    # from the plain form's, and both from the composition run in float64, by float32 rounding only
    block = randomize(dtr.DiTBlock(64, 4, context_dim=context_dim), scale=0.1)
    block64 = copy.deepcopy(block).double()
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(4, 16, 64, generator=g), torch.randn(4, 64, generator=g)
    ctx = None if context_dim is None else torch.randn(4, 5, context_dim, generator=g)
    keep = None if context_dim is None else torch.rand(4, 5, generator=g) > 0.3
    t = torch.tensor([0, 400, 999, 700])

    def run(f, blk, dtype, m):
        """Output and gradients (input, condition, parameters) of a loss that sees every output."""
        zz, cc = z.to(dtype, copy=True).requires_grad_(), c.to(dtype, copy=True).requires_grad_()
        blk.zero_grad(set_to_none=True)
        out = f(blk, zz, cc, m.to(dtype), None if ctx is None else ctx.to(dtype), keep)
        weighted_sum(out).backward()
        return [out.detach(), zz.grad, cc.grad, *(p.grad for p in blk.parameters())]

    def form(fused):
        def f(blk, *a):
            blk.fused = fused
            return blk(*a)

        return f

    for m in (dtr.dtr_masks(1000, 64)[t], dtr.random_masks(1000, 64, seed=3)[t], torch.ones(4, 64)):
        plain = run(form(fused=False), block, torch.float32, m)
        fused = run(form(fused=True), block, torch.float32, m)
        official = run(official_routed_block, block, torch.float32, m)
        exact = run(official_routed_block, block64, torch.float64, m)
        assert all(torch.equal(a, b) for a, b in zip(plain, official))
        for a, b, ref in zip(fused, plain, exact):
            budget = float32_budget(ref)
            assert (b.double() - ref).abs().max() <= budget
            assert (a.double() - ref).abs().max() <= budget
            assert (a - b).abs().max() <= budget


class FullSizeTensors(TorchDispatchMode):
    """Counts the tensors with a given number of elements that aten ops compute (views excluded): run on a block's
    input size N*T*D, its full-size passes (plus same-size tensors such as attention's, the same in both paths)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.count += 0 if func.is_view else sum(isinstance(o, torch.Tensor) and o.numel() == self.numel for o in outs)
        return out


@pytest.mark.parametrize("context_dim", [None, 8])
def test_routed_block_computes_dits_passes_plus_one_in_backward(context_dim):
    # What routing costs, counted rather than timed: the fused routed block computes as many full-size tensors as DiT's
    # block in forward and one more in backward (Fork's blend g_skip + m * g_h); the text block's ungated
    # cross-attention branch joins two streams, one more each way
    block = randomize(dtr.DiTBlock(32, 4, context_dim=context_dim, fused=True))
    z, c = torch.randn(2, 13, 32, requires_grad=True), torch.randn(2, 32)  # 832 elements, unlike any parameter
    ctx = None if context_dim is None else torch.randn(2, 3, context_dim)

    def passes(mask):
        block.zero_grad(set_to_none=True)
        z.grad = None  # or backward would add into it
        with FullSizeTensors(z.numel()) as forward:
            loss = weighted_sum(block(z, c, mask, ctx))
        with FullSizeTensors(z.numel()) as backward:
            loss.backward()
        return forward.count, backward.count

    (dit_fwd, dit_bwd), (routed_fwd, routed_bwd) = passes(None), passes(dtr.dtr_masks(1000, 32)[[0, 999]])
    extra = 0 if context_dim is None else 1
    assert (routed_fwd, routed_bwd) == (dit_fwd + extra, dit_bwd + 1 + extra)
    assert dit_fwd > 10  # the counter saw the block's ops (0 == 0 would pass)


def test_routed_dit_compiles_whole_and_trains_as_eager():
    # Fork and Join (custom autograd nodes, one in place) must not split dynamo's graph, or torch.compile loses its
    # fusions; AOTAutograd traces their backward, which must give eager's gradients
    model = tiny_dit(routing="dtr")
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 300, 700, 999]), torch.tensor([0, 1, 2, 9])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.bool))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)

    def grads(net):
        model.zero_grad(set_to_none=True)
        out = net(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.bool))
        weighted_sum(out).backward()
        return [out.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    torch._dynamo.reset()
    for compiled, eager in zip(grads(torch.compile(model, backend="aot_eager")), grads(model)):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_routing_none_equals_beta_one():
    none, full = tiny_dit(routing="none"), tiny_dit(routing="dtr", beta=1.0)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 500, 999]), torch.tensor([0, 1, 2, 9])
    with torch.no_grad():  # all-ones masks: the routed block's fused joins (addcmul) round differently
        torch.testing.assert_close(full(x, t, y), none(x, t, y), rtol=0, atol=FORWARD_ATOL)
        assert not torch.allclose(none(x, t, y), tiny_dit(routing="dtr")(x, t, y), atol=1e-4)


def test_masks_select_by_timestep_per_sample():
    model = tiny_dit(routing="dtr").eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        batched = model(x, torch.tensor([10, 990]), y)
        assert torch.allclose(batched[1:], model(x[1:], torch.tensor([990]), y[1:]), atol=FORWARD_ATOL)
        assert torch.allclose(batched[:1], model(x[:1], torch.tensor([10]), y[:1]), atol=FORWARD_ATOL)


def test_output_shapes_and_learned_sigma():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    assert tiny_dit()(x, t, torch.tensor([0, 1])).shape == (2, 8, 8, 8)
    assert tiny_dit(learn_sigma=False)(x, t, torch.tensor([0, 1])).shape == (2, 4, 8, 8)


def cfg_outputs(scale, **kw):
    """A tiny DiT's forward_with_cfg on [x, x] (labels, then the null class), and its outputs on x with and without
    the labels (batches of 2, which may round apart from the batch of 4: FORWARD_ATOL)."""
    model = tiny_dit().eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 5, 5, 5])
    xx, y = torch.cat([x, x]), torch.tensor([3, 7, 10, 10])  # null class = num_classes = 10
    with torch.no_grad():
        return model.forward_with_cfg(xx, t, y, scale, **kw), model(x, t[:2], y[:2]), model(x, t[:2], y[2:])


def test_dit_cfg_scale_one_is_conditional():
    out, cond, _ = cfg_outputs(1.0)
    assert torch.allclose(out[:2], cond, atol=FORWARD_ATOL)


def test_dit_cfg_guides_all_four_eps_channels_in_both_halves():
    g, cond, uncond = cfg_outputs(4.0)
    # 4 * cond - 3 * uncond carries up to 4 + 3 + 2 (rounding of cond - uncond) times one forward's error
    assert torch.allclose(g[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=9 * FORWARD_ATOL)
    assert torch.equal(g[:2, :4], g[2:, :4])


def test_dit_cfg_leaves_learned_sigma_unguided():
    g, cond, _ = cfg_outputs(4.0)
    assert torch.allclose(g[:2, 4:], cond[:, 4:], atol=FORWARD_ATOL)


def test_dit_cfg_guided_channels_three_as_facebookresearch_dit():
    dit3, cond, _ = cfg_outputs(4.0, guided_channels=3)  # facebookresearch/DiT's behaviour: channel 3 unguided
    g, _, _ = cfg_outputs(4.0)
    assert torch.allclose(dit3[:2, 3], cond[:, 3], atol=FORWARD_ATOL) and torch.equal(dit3[:2, :3], g[:2, :3])


def test_label_dropout_uses_num_classes_as_null():
    emb = dtr.LabelEmbedder(10, 8, dropout_prob=1.0)
    out = emb(torch.tensor([0, 5, 9]), train=True)
    assert torch.equal(out, emb.embedding_table.weight[10].expand(3, 8))
    assert torch.equal(emb(torch.tensor([5]), train=False), emb.embedding_table.weight[5:6])
    forced = emb(torch.tensor([1, 2]), train=True, force_drop_ids=torch.tensor([False, True]))
    assert torch.equal(forced, emb.embedding_table.weight[[1, 10]])  # the caller's draw replaces the random one
    integer = emb(torch.tensor([1, 2]), train=True, force_drop_ids=torch.tensor([0, 1]))  # DiT passes 0/1 integers
    assert torch.equal(integer, emb.embedding_table.weight[[1, 10]])


def test_dit_label_table_and_unconditional_labels_as_facebookresearch_dit():
    # facebookresearch/DiT keeps the null row whenever class_dropout_prob > 0, one class included: 2 rows
    torch.manual_seed(0)
    one = randomize(dtr.DiT_models["DiT-T/2"](input_size=8, num_classes=1)).eval()
    assert one.y_embedder.embedding_table.weight.shape[0] == 2 and one.y_embedder.dropout_prob == 0.1
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        assert torch.equal(one(x, t), one(x, t, torch.zeros(2, dtype=torch.long)))  # y=None: the one class
        assert not torch.allclose(one(x, t), one(x, t, torch.ones(2, dtype=torch.long)), atol=1e-4)
    bare = dtr.DiT_models["DiT-T/2"](input_size=8, num_classes=1, class_dropout_prob=0.0)  # train.py's unconditional
    assert bare.y_embedder.embedding_table.weight.shape[0] == 1


def test_dit_without_labels_uses_the_null_class_or_refuses():
    model = tiny_dit().eval()  # 10 classes, label dropout: null class 10
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t, torch.tensor([10, 10])))
        assert not torch.allclose(model(x, t), model(x, t, torch.tensor([0, 0])), atol=1e-4)  # not class 0
    with pytest.raises(ValueError, match="needs labels y"):
        tiny_dit(class_dropout_prob=0.0)(x, t)


@pytest.mark.parametrize("name", ["DiT-XL/2", "ADM-64"])
@pytest.mark.parametrize("routing", ["dtr", "random", "cdtr"])
def test_models_build_on_the_meta_device(name, routing):
    with torch.device("meta"):
        big = dtr.MODELS[name](routing=routing)
    count = sum(p.numel() for p in big.parameters())
    assert count == {"DiT-XL/2": 675_129_632, "ADM-64": 295_904_454}[name]
    assert all(p.is_meta for p in big.parameters()) and all(b.is_meta for b in big.buffers())
    # a small one materialised from meta (to_empty, then reset_parameters as FSDP does) gets the same masks
    small = {"DiT-XL/2": ("DiT-T/2", 8), "ADM-64": ("ADM-T", 16)}[name]
    ref = dtr.MODELS[small[0]](input_size=small[1], routing=routing)
    with torch.device("meta"):
        model = dtr.MODELS[small[0]](input_size=small[1], routing=routing)
    model.to_empty(device="cpu")
    model.router.reset_parameters()
    tables = list(model.router.buffers())
    assert len(tables) > 0 and all(torch.equal(a, b) for a, b in zip(tables, ref.router.buffers()))
    # the masks' values, checked against the formula, not against the code under test
    width = ref.router.widths[0]
    expected = reference_dtr(1000, width, 4.0, 0.8) if routing == "dtr" else None
    if expected is not None:
        assert torch.equal(tables[ref.router.table_of_block[0]], expected.bool())


def test_beta_that_leaves_no_channel_is_refused():
    with pytest.raises(ValueError, match="leaves none of 128 channels active"):
        dtr.DiT_models["DiT-T/2"](input_size=8, beta=0.005)
    with pytest.raises(ValueError, match="leaves none"):
        dtr.ADM_models["ADM-T"](input_size=16, routing="random", beta=0.01)


@pytest.mark.parametrize("context_dim", [None, 16])
def test_dit_gradient_checkpointing_same_grads_and_state_dict(context_dim):
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 990])
    y = torch.randn(3, 5, 16) if context_dim else torch.tensor([1, 8, 3])
    runs = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        m = randomize(
            dtr.DiT_models["DiT-T/2"](
                input_size=8, num_classes=10, context_dim=context_dim, use_checkpoint=use_checkpoint
            )
        )  # routing dtr; no identity blocks
        saved = []  # bytes autograd keeps for backward, outside the checkpointed blocks' own recomputation

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = m(x, t, y, force_drop_ids=torch.tensor([0, 1, 0]))
        out.square().mean().backward()
        runs.append((m, out.detach(), sum(saved)))
    (a, out_a, saved_a), (b, out_b, saved_b) = runs
    assert list(a.state_dict()) == list(b.state_dict())  # no new keys: checkpoints load either way
    assert saved_b < saved_a / 2  # checkpointing is on: the blocks' activations are not kept
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.requires_grad:
            assert p.grad.abs().max() > 0 and (p.grad - q.grad).abs().max() <= 1e-6, name


def dit_pos_table(dim, grid):
    """facebookresearch/DiT's fixed 2-D sin-cos table (G*G, dim), built in numpy float64 as DiT builds it: the first
    half of the dims encodes a token's column, the second half its row; each half is [sin | cos] of pos * omega."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (dim/4,)
    row, col = np.divmod(np.arange(grid * grid), grid)  # token k sits at (row, col) = divmod(k, G)
    half = lambda pos: np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], axis=1)
    return torch.from_numpy(np.concatenate([half(col), half(row)], axis=1)).float()


def dit_op_order_forward(model, x, t, y):
    """facebookresearch/DiT's forward (timm >= 0.9 blocks: fused attention) from the model's weights, op for op:
    patchify conv + sin-cos positions, [cos | sin] frequency embedding + MLP, label row, adaLN-Zero blocks, final
    adaLN layer, unpatchify."""
    p, D = model.patch_size, model.pos_embed.shape[-1]
    (n, _, H, W), g = x.shape, x.shape[-1] // p
    lin = lambda v, layer: F.linear(v, layer.weight, layer.bias)
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)
    mod = lambda v, shift, scale: v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    proj = model.x_embedder.proj
    z = F.conv2d(x, proj.weight, proj.bias, stride=p).flatten(2).transpose(1, 2) + dit_pos_table(D, g)  # (N, T, D)
    half = model.t_embedder.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    mlp = model.t_embedder.mlp
    c = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), mlp[0])), mlp[2])  # (N, D)
    c = c + model.y_embedder.embedding_table.weight[y]
    heads = model.blocks[0].attn.num_heads
    for b in model.blocks:
        s1, g1, a1, s2, g2, a2 = lin(F.silu(c), b.adaLN_modulation[1]).chunk(6, dim=1)
        qkv = lin(mod(ln(z), s1, g1), b.attn.qkv).reshape(n, -1, 3, heads, D // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, heads, T, D/heads) each
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, D)
        z = z + a1.unsqueeze(1) * lin(o, b.attn.proj)
        h = lin(F.gelu(lin(mod(ln(z), s2, g2), b.mlp.fc1), approximate="tanh"), b.mlp.fc2)
        z = z + a2.unsqueeze(1) * h
    fl = model.final_layer
    shift, scale = lin(F.silu(c), fl.adaLN_modulation[1]).chunk(2, dim=1)
    out = lin(mod(ln(z), shift, scale), fl.linear)  # (N, T, p*p*C_out)
    c_out = out.shape[-1] // (p * p)
    out = out.reshape(n, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # (N, C_out, G, p, G, p)
    return out.reshape(n, c_out, H, W)


def test_unrouted_dit_forward_equals_a_dit_written_in_the_test():
    # With routing="none" every op runs in facebookresearch/DiT's order, so the output is the op-for-op reference's
    # bit for bit (on every CPU capability: the same kernels see the same operands). Labels include the null class.
    torch.manual_seed(0)
    model = randomize(dtr.DiT_models["DiT-T/2"](input_size=8, num_classes=10, routing="none")).eval()
    assert torch.equal(model.pos_embed[0], dit_pos_table(128, 4))  # frozen (not randomized): DiT's numpy table
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 500, 999]), torch.tensor([3, 10, 0, 9])
    with torch.no_grad():
        out, ref = model(x, t, y), dit_op_order_forward(model, x, t, y)
    assert ref.abs().max() > 0.5 and ref[:, :4].std() > 0.1  # the zero-initialised layers contribute
    assert torch.equal(out, ref)


#################################################################################
#                          dtr.py: ADM (UNet) with DTR                          #
#################################################################################


def window(channels, lo, hi, n=2):
    """A routing mask (n, channels) with channels [lo, hi) active."""
    m = torch.zeros(n, channels)
    m[:, lo:hi] = 1
    return m


# -- architecture: identical to guided-diffusion's UNetModel
def test_adm64_parameter_count_matches_guided_diffusion():
    with torch.device("meta"):
        cond = dtr.ADM_models["ADM-64"](num_classes=1000, routing="none")
        uncond = dtr.ADM_models["ADM-64"](num_classes=None, routing="none")
        cfg = dtr.ADM_models["ADM-64"](num_classes=1000, class_dropout_prob=0.1, routing="none")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(cond) == 295_904_454  # guided-diffusion's ImageNet-64 model
    assert count(cond) - count(uncond) == 1000 * 768  # only the label embedding (1000 x 4 * 192)
    assert count(cfg) - count(cond) == 768  # the null-class row


def test_adm64_state_dict_layout():
    with torch.device("meta"):
        sd = dtr.ADM_models["ADM-64"](routing="none").state_dict()
    expected = {  # derived from the architecture: 192 channels, mult (1, 2, 3, 4), 3 res blocks, AdaGN, updown blocks
        "time_embed.0.weight": (768, 192),
        "label_emb.weight": (1000, 768),
        "input_blocks.0.0.weight": (192, 3, 3, 3),
        "input_blocks.4.0.in_layers.2.weight": (192, 192, 3, 3),  # downsampling ResBlock after level 0
        "input_blocks.5.0.skip_connection.weight": (384, 192, 1, 1),
        "input_blocks.5.0.emb_layers.1.weight": (2 * 384, 768),  # scale and shift
        "input_blocks.5.1.qkv.weight": (3 * 384, 384, 1),  # attention at 32x32 (ds 2)
        "middle_block.1.proj_out.weight": (768, 768, 1),
        "output_blocks.0.0.in_layers.0.weight": (1536,),  # GroupNorm over the concatenated skip
        "output_blocks.0.0.in_layers.2.weight": (768, 1536, 3, 3),
        "output_blocks.3.2.out_layers.3.weight": (768, 768, 3, 3),  # upsampling ResBlock ending level 3
        "out.2.weight": (6, 192, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert sum(k.startswith("input_blocks.") and k.endswith(".0.weight") and k.count(".") == 3 for k in sd) == 1
    assert max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks.")) == 15  # 4 levels x 4 blocks
    assert not any("router" in k or "table" in k for k in sd)  # masks are derived state, never saved


def test_adm_conv_resampling_layout_and_legacy_heads():
    with torch.device("meta"):
        m = dtr.ADM(32, 3, 64, 3, 2, (2,), channel_mult=(1, 2), num_heads=4, num_heads_upsample=2, routing="none")
    sd = m.state_dict()
    assert tuple(sd["input_blocks.3.0.op.weight"].shape) == (64, 64, 3, 3)  # strided-conv Downsample
    assert tuple(sd["output_blocks.2.2.conv.weight"].shape) == (128, 128, 3, 3)  # Upsample conv
    assert "input_blocks.1.0.skip_connection.weight" not in sd  # identity skip when widths agree
    assert tuple(sd["input_blocks.1.0.emb_layers.1.weight"].shape) == (64, 256)  # no scale-shift: C_out only
    assert m.input_blocks[4][1].num_heads == 4 and m.output_blocks[0][1].num_heads == 2
    assert m.middle_block[1].num_heads == 4


def test_adm_zero_init_like_adm():
    m = dtr.ADM_models["ADM-T"](input_size=16)
    zeroed = {n for n, p in m.named_parameters() if not p.any()}
    assert all(
        n in zeroed
        for n, _ in m.named_parameters()
        if ".out_layers.3." in n or ".proj_out." in n or n.startswith("out.2.")
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    assert torch.equal(m(x, t), torch.zeros(2, 6, 16, 16))  # the final conv starts at zero


@pytest.mark.parametrize("new_order", [False, True])
def test_adm_attention_head_layouts(new_order):
    torch.manual_seed(0)
    blk = randomize(dtr.AttentionBlock(64, num_heads=4, use_new_attention_order=new_order), scale=0.3, seed=0, add=True)
    x = torch.randn(2, 64, 4, 4)
    qkv = blk.qkv(blk.norm(x.reshape(2, 64, 16)))  # (N, 3C, L)
    if new_order:  # [q | k | v], each cut into heads
        q, k, v = (a.reshape(8, 16, 16) for a in qkv.chunk(3, dim=1))
    else:  # cut into heads, each [q | k | v]
        q, k, v = qkv.reshape(8, 48, 16).split(16, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 16**0.5, dim=-1)
    ref = x + blk.proj_out(torch.einsum("bts,bcs->bct", w, v).reshape(2, 64, 16)).reshape(2, 64, 4, 4)
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_adm_group_norm_in_float32():
    gn = dtr.GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4).bfloat16()
    out = gn(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.group_norm(x.float(), 32, gn.weight, gn.bias).bfloat16())


# -- where the routing mask acts (App. A.1, Pseudo Code 2)
@pytest.mark.parametrize("updown", [None, "down", "up"])
def test_adm_resblock_mask_after_norm_and_skip_unmasked(updown):
    torch.manual_seed(0)
    blk = randomize(
        dtr.ResBlock(64, 32, 0.0, 64, use_scale_shift_norm=True, updown=updown), scale=0.1, seed=0, add=True
    ).eval()
    x, emb = torch.randn(2, 64, 8, 8), torch.randn(2, 32)
    mask = window(64, 0, 32)  # 32 groups of 2 channels: groups 16..31 are wholly inactive
    seen = {}
    blk.in_layers[2].register_forward_pre_hook(lambda mod, a: seen.__setitem__("conv_in", a[0]))
    blk.out_layers[3].register_forward_hook(lambda mod, a, out: seen.__setitem__("residual", out))
    out = blk(x, emb, mask)
    # the conv sees m_t * SiLU(GN(z)) (resampled), with GN's statistics taken over the unmasked z
    assert torch.equal(seen["conv_in"], dtr.resample(F.silu(blk.in_layers[0](x)) * mask[:, :, None, None], updown))
    residual = seen["residual"]
    x2 = x.clone()
    x2[:, 40] += 3.0  # an inactive channel whose GroupNorm group (40, 41) is inactive too
    out2 = blk(x2, emb, mask)
    assert torch.equal(seen["residual"], residual)  # cannot influence the residual branch ...
    delta = dtr.resample(x2 - x, updown)
    torch.testing.assert_close(out2 - out, delta, rtol=0, atol=1e-5)  # ... but the skip path carries it
    assert (out2 - out)[:, 40].abs().min() > 1.0


def test_adm_attention_mask_after_norm_and_skip_unmasked():
    torch.manual_seed(0)
    blk = randomize(
        dtr.AttentionBlock(64, num_head_channels=32, use_new_attention_order=True), scale=0.1, seed=0, add=True
    )
    x, mask = torch.randn(2, 64, 4, 4), window(64, 16, 64)
    seen = {}
    blk.qkv.register_forward_pre_hook(lambda mod, a: seen.__setitem__("qkv_in", a[0]))
    blk.proj_out.register_forward_hook(lambda mod, a, out: seen.__setitem__("residual", out))
    out = blk(x, None, mask)
    assert torch.equal(seen["qkv_in"], blk.norm(x.reshape(2, 64, 16)) * mask[:, :, None])  # m_t * GN(z), no SiLU
    residual = seen["residual"]
    x2 = x.clone()
    x2[:, 3] -= 2.0  # inactive, in the inactive group (2, 3)
    out2 = blk(x2, None, mask)
    assert torch.equal(seen["residual"], residual)
    assert torch.equal(out2 - out != 0, x2 - x != 0)  # only the skip path changes, and only channel 3


def test_adm_every_block_gets_its_input_width_mask():
    m = tiny()
    t = torch.tensor([0, 500, 999])
    masks = m.router(t)
    widths, checked = [], []

    def hook(mod, args):
        x, _, mask = args
        widths.append(x.shape[1])
        assert mask.shape == (3, x.shape[1]) and (mask.sum(1) == int(0.8 * x.shape[1])).all()
        checked.append(torch.equal(mask, masks[len(widths) - 1]))

    for mod in m.modules():
        if isinstance(mod, (dtr.ResBlock, dtr.AttentionBlock)):
            mod.register_forward_pre_hook(hook)
    m(torch.randn(3, 3, 16, 16), t)
    # input blocks, middle block, output blocks (whose ResBlocks normalise the concatenated skip)
    assert widths == [32, 32, 32, 64, 64, 64, 64, 128, 64, 96, 64, 64, 96, 64]
    assert all(checked)
    assert torch.equal(masks[0][0], dtr.dtr_masks(1000, 32)[0].bool().float())  # DTR windows (App. A, Code 1)
    assert torch.equal(masks[7][2], dtr.dtr_masks(1000, 128)[999])


def test_adm_conv_inputs_zero_outside_window_in_all_blocks():
    m = tiny()
    t = torch.tensor([600, 600])
    zero_rows = []

    def check(mod, args):  # the first conv / qkv input: masked channels are exactly zero, active ones are not
        inactive = args[0].flatten(2).abs().amax(dim=(0, 2)) == 0
        zero_rows.append(inactive)

    for mod in m.modules():
        if isinstance(mod, dtr.ResBlock):
            mod.in_layers[2].register_forward_pre_hook(check)
        elif isinstance(mod, dtr.AttentionBlock):
            mod.qkv.register_forward_pre_hook(check)
    m(torch.randn(2, 3, 16, 16), t)
    masks = m.router(t)
    assert len(zero_rows) == len(masks) == 14
    assert all(torch.equal(z, mk[0] == 0) for z, mk in zip(zero_rows, masks))


# -- model-level behaviour
def test_adm_routing_none_equals_beta_one():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    off, full = tiny(routing="none"), tiny(routing="dtr", beta=1.0)
    assert torch.equal(off(x, t), full(x, t))
    routed = tiny(routing="dtr")
    assert (routed(x, t) - off(x, t)).abs().max() > 1e-4  # beta = 0.8 does route


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_adm_output_shape(learn_sigma):
    m = tiny(learn_sigma=learn_sigma, num_classes=10)
    out = m(torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16)


def test_adm_registry_accepts_dit_keywords():
    kw = dict(
        input_size=16,
        in_channels=4,
        num_classes=1,
        learn_sigma=True,
        class_dropout_prob=0.1,
        routing="random",
        alpha=2.0,
        beta=0.5,
        num_tasks=100,
        routing_seed=3,
    )
    m = dtr.ADM_models["ADM-T"](**kw, dropout=0.2)
    assert m.in_channels == 4 and m.num_classes is None and not hasattr(m, "label_emb")
    assert m(torch.randn(2, 4, 16, 16), torch.tensor([0, 99])).shape == (2, 8, 16, 16)
    assert {"ADM-64", "ADM-FFHQ-64", "ADM-T"} <= set(dtr.ADM_models)


def test_adm_labels_and_null_class():
    m = tiny(num_classes=10, class_dropout_prob=0.1)
    assert m.label_emb.num_embeddings == 11
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    torch.testing.assert_close(m(x, t, None), m(x, t, torch.tensor([10, 10])), rtol=0, atol=0)
    always = tiny(num_classes=10, class_dropout_prob=1.0)  # training would drop every label
    y = torch.tensor([3, 4])
    with torch.no_grad():
        null = always(x, t, torch.tensor([10, 10]))
        assert not torch.allclose(always(x, t, y), null, atol=1e-4)  # eval mode: no label dropout, y counts
        assert torch.equal(always.train()(x, t, y), null)  # training mode: every label dropped to the null class
    with pytest.raises(ValueError):
        tiny(num_classes=10)(x, t)  # no null class without label dropout


def test_adm_bf16_autocast_close_to_fp32():
    m = tiny(num_classes=10)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([30, 600]), torch.tensor([1, 2])
    ref = m(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)  # bf16: 8 significant bits, 4e-3 at 1


def test_adm_cfg_scale_one_is_conditional():
    m = tiny(num_classes=10, class_dropout_prob=0.1)
    x0, t0, y0 = torch.randn(2, 3, 16, 16), torch.tensor([100, 800]), torch.tensor([2, 7])
    x, t, y = torch.cat([x0, x0]), torch.cat([t0, t0]), torch.cat([y0, torch.full((2,), 10)])
    cond = m(x0, t0, y0)
    out = m.forward_with_cfg(x, t, y, 1.0)
    torch.testing.assert_close(out[:2], cond, rtol=0, atol=FORWARD_ATOL)
    assert torch.equal(out[2:, :3], out[:2, :3])  # both halves carry the guided eps
    guided = m.forward_with_cfg(x, t, y, 4.0)
    assert (guided[:2, :3] - cond[:, :3]).abs().max() > 1e-4
    torch.testing.assert_close(guided[:2, 3:], cond[:, 3:], rtol=0, atol=FORWARD_ATOL)  # learned sigma is not guided


def test_adm_gradient_checkpointing_same_output_and_grads():
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([50, 950]), torch.tensor([1, 8])
    results = []
    for use_checkpoint in (False, True):
        m = tiny(num_classes=10, dropout=0.1, use_checkpoint=use_checkpoint).train()
        torch.manual_seed(1)  # the same dropout draws; checkpointing replays them
        out = m(x, t, y)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in m.parameters()]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_adm_training_steps_lower_the_loss():
    torch.manual_seed(0)
    m = dtr.ADM_models["ADM-T"](input_size=16, num_classes=10).train()
    diffusion = dtr.create_diffusion("")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y, t = torch.tensor([0, 1, 2, 3]), torch.tensor([10, 250, 500, 900])
    noise = torch.randn(x0.shape, generator=g)
    loss = lambda: diffusion.training_losses(m, x0, t, dict(y=y), noise=noise)["loss"].mean()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    with torch.no_grad():
        m.eval()
        before = loss().item()
        m.train()
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        m.eval()
        after = loss().item()
    assert after < 0.85 * before


#################################################################################
#                           dtr.py: Gaussian diffusion                          #
#################################################################################


def test_linear_and_cosine_beta_schedules_match_closed_forms():
    lin = dtr.get_named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02) and lin.dtype == np.float64
    assert dtr.get_named_beta_schedule("linear", 500)[-1] == pytest.approx(0.04)  # scaled to T
    cos = dtr.get_named_beta_schedule("cosine", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = np.cumprod(1 - cos)
    assert abar[499] == pytest.approx(f(0.5) / f(0), rel=1e-9)  # closed form while betas are unclipped
    assert cos.max() == 0.999 and cos[-1] == 0.999
    with pytest.raises(ValueError, match="unknown noise schedule"):
        dtr.get_named_beta_schedule("sigmoid", 10)


def test_q_sample_and_posterior_closed_forms():
    d = dtr.create_diffusion("", noise_schedule="cosine")
    betas = dtr.get_named_beta_schedule("cosine", 1000)
    abar = np.cumprod(1 - betas)
    x0, eps, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0, 10, 900])
    xt = d.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(xt[i], math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * eps[i], atol=1e-5)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ap = abar[ti - 1] if ti > 0 else 1.0
        c1 = math.sqrt(ap) * betas[ti] / (1 - abar[ti])
        c2 = math.sqrt(1 - betas[ti]) * (1 - ap) / (1 - abar[ti])
        assert torch.allclose(mean[i], c1 * x0[i] + c2 * xt[i], atol=1e-5)
        assert var[i].item() == pytest.approx(betas[ti] * (1 - ap) / (1 - abar[ti]), rel=1e-5, abs=1e-12)
    assert logvar[0].item() == pytest.approx(
        math.log(betas[1] * (1 - abar[0]) / (1 - abar[1])), rel=1e-6
    )  # clipped at t=0
    assert torch.allclose(d.predict_xstart_from_eps(xt, t, eps), x0, atol=1e-4)


class Oracle(torch.nn.Module):
    """Predicts the true noise of a known x_0 and the variance code v (learned range: -1 = posterior variance)."""

    def __init__(self, diffusion, x0, v=-1.0):
        super().__init__()
        self.d, self.x0, self.v = diffusion, x0, v

    def forward(self, x, t, y=None):
        abar = (
            torch.from_numpy(np.cumprod(1 - dtr.get_named_beta_schedule("linear", 1000)))[t].float().view(-1, 1, 1, 1)
        )
        eps = (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.full_like(x, self.v)], dim=1)


def test_training_losses_vanish_for_an_oracle():
    d = dtr.create_diffusion("")
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t, noise = torch.tensor([0, 1, 400, 999]), torch.randn(4, 3, 4, 4)
    out = d.training_losses(Oracle(d, x0), x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"} and all(v.shape == (4,) for v in out.values())
    assert out["mse"].max() < 1e-6
    assert out["vb"][1:].abs().max() < 1e-4  # KL(q || p) = 0 when p is the true posterior
    assert out["vb"][0] > 0  # at t = 0 the term is the discretised decoder NLL in bits/dim
    worse = d.training_losses(Oracle(d, x0, v=0.5), x0, t, noise=noise)
    # a wrong variance costs bits (t=1: beta vs beta~ differ most), and not one rounding of the same eps's MSE
    assert worse["vb"][1] > 0.01 and torch.equal(worse["mse"], out["mse"])


def test_loss_weights_match_closed_forms():
    t = torch.tensor([0, 50, 300, 999])
    abar = np.cumprod(1 - dtr.get_named_beta_schedule("cosine", 1000))
    snr = torch.tensor(abar / (1 - abar))[t].float()
    kw = dict(noise_schedule="cosine")
    assert torch.allclose(dtr.create_diffusion("", **kw, loss_weight="min-snr").mse_weight(t), snr.clamp(max=5) / snr)
    assert torch.allclose(
        dtr.create_diffusion("", **kw, loss_weight="min-snr", min_snr_gamma=1.0, predict_xstart=True).mse_weight(t),
        snr.clamp(max=1),
    )
    assert torch.allclose(
        dtr.create_diffusion("", **kw, loss_weight="p2", p2_gamma=0.5, p2_k=2.0).mse_weight(t), 1 / (2 + snr) ** 0.5
    )
    # the weight multiplies each sample's MSE (not the VB term), one scalar per sample
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 6, 3, padding=1)
    model = lambda x, tt: net(x)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    plain = dtr.create_diffusion("", **kw).training_losses(model, x0, t, noise=noise)
    p2 = dtr.create_diffusion("", **kw, loss_weight="p2").training_losses(model, x0, t, noise=noise)
    assert torch.allclose(p2["mse"], plain["mse"] / (1 + snr), rtol=1e-5) and torch.allclose(p2["vb"], plain["vb"])
    with pytest.raises(ValueError, match="unknown loss weight"):
        dtr.create_diffusion("", loss_weight="uw")


def test_respacing_keeps_original_timesteps():
    kept = dtr.space_timesteps(1000, "250")
    assert len(kept) == 250 and min(kept) == 0 and max(kept) == 999
    assert sorted(kept)[:4] == [0, 4, 8, 12]  # stride 999/249
    assert dtr.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert dtr.space_timesteps(100, "10,5") == {0, 5, 11, 16, 22, 27, 33, 38, 44, 49} | {50, 62, 74, 87, 99}
    base, d = dtr.create_diffusion(""), dtr.create_diffusion("250")
    assert d.num_timesteps == 250 and torch.equal(d.timestep_map, torch.tensor(sorted(kept)))
    assert torch.allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12)  # same noise levels
    seen = []

    def model(x, t, y=None):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.p_sample_loop(model, (2, 1, 2, 2), device="cpu")
    assert seen[0] == [999, 999] and seen[-1] == [0, 0] and len(seen) == 250
    assert [s[0] for s in seen] == sorted(kept, reverse=True)
    with pytest.raises(ValueError, match="cannot divide"):
        dtr.space_timesteps(10, "20")


def test_one_step_sampling_returns_the_clipped_x0_prediction():
    d = dtr.create_diffusion("1", noise_schedule="cosine")  # keeps t = 0 alone, like guided-diffusion
    assert d.timestep_map.tolist() == [0] and d.posterior_mean_coef1.item() == 1.0  # abar_prev = 1 at the only step
    eps = torch.randn(2, 3, 4, 4)
    model = lambda x, t, y=None: torch.cat([eps, torch.zeros_like(eps)], 1)
    x_T = torch.randn(2, 3, 4, 4)
    out = d.p_sample_loop(model, x_T.shape, noise=x_T, device="cpu", clip_denoised=True)
    abar = d.alphas_cumprod[0].item()
    assert torch.allclose(out, ((x_T - (1 - abar) ** 0.5 * eps) / abar**0.5).clamp(-1, 1), atol=1e-6)


def test_sampling_is_per_sample_reproducible():
    model = tiny_dit().eval()
    d = dtr.create_diffusion("5")
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(model_kwargs=dict(y=torch.tensor([1, 2, 3])), device="cpu")
    a = d.p_sample_loop(model, (3, 4, 8, 8), generators=gens([7, 8, 9]), **kw)
    b = d.p_sample_loop(model, (1, 4, 8, 8), generators=gens([9]), model_kwargs=dict(y=torch.tensor([3])), device="cpu")
    # sample 9 does not depend on its batch: its 5 unclipped steps reach ~500, where a model output's rounding in
    # another batch size (FORWARD_ATOL) has been scaled up with x; 1e-5 of the largest value is ~80 ulps of it
    assert torch.allclose(a[2:], b, rtol=0, atol=1e-5 * b.abs().max().item())
    x_T = torch.randn(3, 4, 8, 8)
    c1 = d.p_sample_loop(model, x_T.shape, noise=x_T, sampler="ddim", generators=gens([1, 2, 3]), **kw)
    c2 = d.p_sample_loop(model, x_T.shape, noise=x_T, sampler="ddim", generators=gens([4, 5, 6]), **kw)
    assert torch.equal(c1, c2)  # DDIM with eta = 0 is a deterministic map of x_T: the step noise is never used
    d1 = d.p_sample_loop(model, x_T.shape, noise=x_T, generators=gens([1, 2, 3]), **kw)
    d2 = d.p_sample_loop(model, x_T.shape, noise=x_T, generators=gens([4, 5, 6]), **kw)
    assert not torch.allclose(d1, d2, atol=1e-3)  # while DDPM draws fresh noise at every step
    with pytest.raises(ValueError, match="unknown sampler"):
        d.p_sample_loop(model, x_T.shape, sampler="euler", **kw)


def test_ddpm_loop_matches_a_reference_sampler():
    # guided-diffusion's ancestral step with a learned range, from the float64 schedule, every step's noise drawn as
    # torch.randn(shape[1:], generator=g) per sample (the loop fills one buffer in place instead)
    d = dtr.create_diffusion("6", noise_schedule="cosine")
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 4, 3, padding=1)
    model = lambda x, t: net(x) * (1 + t.float()[:, None, None, None] / 1000)
    seeds, shape = [3, 4, 5], (3, 2, 4, 4)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]
    x_T = torch.randn(shape)
    with torch.no_grad():
        ours = d.p_sample_loop(model, shape, noise=x_T, generators=gens(), clip_denoised=True)
        abar = d.alphas_cumprod.numpy()
        betas = 1 - abar / np.append(1.0, abar[:-1])
        x, g = x_T.double(), gens()
        for i in reversed(range(6)):
            t = torch.full((3,), int(d.timestep_map[i]))
            eps, v = model(x.float(), t).double().chunk(2, dim=1)
            ap = abar[i - 1] if i else 1.0
            post_var = betas[i] * (1 - ap) / (1 - abar[i])
            post_log_var = math.log(betas[1] * (1 - abar[0]) / (1 - abar[1]) if i == 0 else post_var)
            log_var = (v + 1) / 2 * math.log(betas[i]) + (1 - v) / 2 * post_log_var
            x0 = ((x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])).clamp(-1, 1)
            mean = (math.sqrt(ap) * betas[i] * x0 + math.sqrt(1 - betas[i]) * (1 - ap) * x) / (1 - abar[i])
            noise = torch.stack([torch.randn(shape[1:], generator=gi) for gi in g]).double()
            x = mean + (i > 0) * torch.exp(0.5 * log_var) * noise
    torch.testing.assert_close(ours, x.float(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="one per sample"):
        d.p_sample_loop(model, shape, generators=gens()[:2])


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run while active (and not paused)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = {}, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_sampling_steps_neither_copy_nor_cast_nor_allocate_setup(sampler, per_sample):
    # the ops a step runs outside the network: lookups (gathers), the update's arithmetic and in-place noise; the
    # timesteps, the device tables and the noise buffer are made once (on CUDA a copy to the device syncs)
    def ops(steps):
        d, log = dtr.create_diffusion(str(steps)), OpLog()

        def model(x, t):
            log.paused = True
            out = torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)
            log.paused = False
            return out

        gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)] if per_sample else None
        d.p_sample_loop(model, (3, 2, 4, 4), generators=gens(), sampler=sampler)  # makes the tables on the CPU
        with log:
            d.p_sample_loop(model, (3, 2, 4, 4), generators=gens(), sampler=sampler)
        return log.ops

    few, many = ops(3), ops(6)
    per_step = {k: (many.get(k, 0) - few.get(k, 0)) / 3 for k in many}
    allocating = {
        "_to_copy",
        "copy_",
        "full",
        "empty",
        "arange",
        "zeros",
        "ones",
        "stack",
        "cat",
        "clone",
        "randn",
        "randn_like",
        "ne",
        "repeat",
    }
    assert not {k for k, n in per_step.items() if n} & allocating, per_step
    assert "_to_copy" not in many  # the tables were cast once, by the first loop, never per lookup
    assert per_step.get("normal_", 0) == (0 if sampler == "ddim" else 3 if per_sample else 1)  # DDIM (eta 0): none
    assert per_step["index"] <= 11  # table lookups: a gather each


#################################################################################
#                             dtr.py: ANT-UW pieces                             #
#################################################################################


def test_timestep_clusters_and_stratified_sampling():
    assert dtr.timestep_clusters(8, 1000) == [(125 * k, 125 * (k + 1)) for k in range(8)]
    assert dtr.timestep_clusters(3, 10) == [(0, 3), (3, 6), (6, 10)]
    t = dtr.sample_timesteps(64, 1000, num_clusters=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dtr.cluster_index(t, 8, 1000), torch.arange(64) % 8)  # any 8 consecutive: one per cluster
    assert len(t.unique()) > 50
    with pytest.raises(ValueError, match="not divisible"):
        dtr.sample_timesteps(12, 1000, num_clusters=8)
    u = dtr.sample_timesteps(10000, 1000, generator=torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 999 and abs(u.float().mean().item() - 499.5) < 10


def test_uncertainty_weighted_loss_matches_the_per_cluster_formula():
    t = torch.tensor([0, 124, 125, 999, 500, 501])
    loss = torch.tensor([1.0, 3.0, 4.0, 8.0, 2.0, 6.0])
    s = torch.tensor([0.0, 0.5, 0, 0, -1.0, 0, 0, 2.0], requires_grad=True)
    # clusters seen: 0 -> mean 2, 1 -> 4, 4 -> mean 4, 7 -> 8; L_k = mean / K
    expected = sum(
        0.5 * (math.exp(-s[k].item()) * m / 8 + s[k].item()) for k, m in [(0, 2.0), (1, 4.0), (4, 4.0), (7, 8.0)]
    )
    got = dtr.uncertainty_weighted_loss(loss, t, s, 1000)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    perm = torch.randperm(6)
    assert dtr.uncertainty_weighted_loss(loss[perm], t[perm], s, 1000).item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert s.grad[2] == 0 and s.grad[0].item() == pytest.approx(0.5 * (1 - 2.0 / 8))  # d/ds 0.5(e^-s L + s) at s=0


#################################################################################
#           dtr.py: text-to-image DiT, COCO captions (App. C, Fig. 8)           #
#################################################################################


def hand_attention(q, k, v, heads, mask=None):
    """softmax(q k^T / sqrt(d)) v per head for q (N, T, D), k and v (N, L, D); mask (N, L) False hides a key."""
    n, _, D = q.shape
    split = lambda a: a.reshape(n, a.shape[1], heads, D // heads)
    s = torch.einsum("nthd,nshd->nhts", split(q), split(k)) / math.sqrt(D // heads)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("nhts,nshd->nthd", torch.softmax(s, dim=-1), split(v)).reshape(q.shape)


def hand_text_block(block, z, c, ctx, ctx_mask=None):
    """Text DiTBlock(z) from its weights: adaLN-Zero self-attention, cross-attention (own LayerNorm, no gate), MLP."""
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    s1, g1, a1, s2, g2, a2 = mod.chunk(6, dim=1)
    heads, cross = block.attn.num_heads, block.cross_attn
    ln = lambda v: (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)
    q, k, v = F.linear(ln(z) * (1 + g1[:, None]) + s1[:, None], block.attn.qkv.weight, block.attn.qkv.bias).chunk(3, -1)
    z = z + a1[:, None] * F.linear(hand_attention(q, k, v, heads), block.attn.proj.weight, block.attn.proj.bias)
    q = F.linear(ln(z) * block.norm_cross.weight + block.norm_cross.bias, cross.q.weight, cross.q.bias)
    k, v = F.linear(ctx, cross.kv.weight, cross.kv.bias).chunk(2, -1)  # keys and values from the text tokens
    z = z + F.linear(hand_attention(q, k, v, heads, ctx_mask), cross.proj.weight, cross.proj.bias)
    h = F.linear(ln(z) * (1 + g2[:, None]) + s2[:, None], block.mlp.fc1.weight, block.mlp.fc1.bias)
    return z + a2[:, None] * F.linear(F.gelu(h, approximate="tanh"), block.mlp.fc2.weight, block.mlp.fc2.bias)


def tiny_text_dit(**kw):
    """A 4-block text DiT on 8x8 inputs reading 16-wide text tokens; random (not zero) weights."""
    torch.manual_seed(0)
    return randomize(dtr.DiT_models["DiT-T/2"](input_size=8, context_dim=16, **kw))


def test_text_block_with_routing_is_eq8():
    block = randomize(dtr.DiTBlock(64, 4, context_dim=24), scale=0.1)
    z, c, ctx = torch.randn(3, 16, 64), torch.randn(3, 64), torch.randn(3, 5, 24)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()  # captions of 3, 5 and 1 tokens
    m = dtr.dtr_masks(1000, 64)[torch.tensor([0, 500, 999])]
    with torch.no_grad():
        routed = block(z, c, m, ctx, keep)
        expected = (1 - m[:, None]) * z + hand_text_block(block, m[:, None] * z, c, ctx, keep)  # Eq. (8), whole block
        assert torch.allclose(routed, expected, atol=1e-5)
        unmasked = block(z, c, m, ctx)
        assert torch.allclose(
            unmasked, (1 - m[:, None]) * z + hand_text_block(block, m[:, None] * z, c, ctx), atol=1e-5
        )
        assert (unmasked[0] - routed[0]).abs().max() > 1e-3 and torch.allclose(
            unmasked[1], routed[1], atol=FORWARD_ATOL
        )
        padded = torch.where(keep[:, :, None], ctx, torch.full_like(ctx, 100.0))  # hidden keys never matter
        assert torch.allclose(block(z, c, m, padded, keep), routed, atol=1e-6)
        dz = torch.zeros_like(z)  # an inactive channel only travels the identity path, past the cross-attention too
        dz[0, :, int((m[0] == 0).nonzero()[0])] = 1.0
        assert torch.allclose(block(z + dz, c, m, ctx, keep)[0] - routed[0], dz[0], atol=1e-5)


def test_text_dit_layout_init_and_timestep_only_adaln():
    torch.manual_seed(0)
    model = dtr.DiT_models["DiT-T/2"](input_size=8, context_dim=16)
    sd, class_sd = model.state_dict(), tiny_dit().state_dict()
    cross = (
        "norm_cross.weight",
        "norm_cross.bias",
        "cross_attn.q.weight",
        "cross_attn.q.bias",
        "cross_attn.kv.weight",
        "cross_attn.kv.bias",
        "cross_attn.proj.weight",
        "cross_attn.proj.bias",
    )
    assert set(sd) - set(class_sd) == {"null_context"} | {f"blocks.{i}.{k}" for i in range(4) for k in cross}
    assert set(class_sd) - set(sd) == {"y_embedder.embedding_table.weight"}  # no label embedder
    assert sd["null_context"].shape == (1, 16) and sd["blocks.2.cross_attn.kv.weight"].shape == (2 * 128, 16)
    assert sd["blocks.0.cross_attn.q.weight"].shape == (128, 128) and not sd["blocks.0.cross_attn.proj.weight"].any()
    assert (
        "null_context" not in dtr.DiT_models["DiT-T/2"](input_size=8, context_dim=16, class_dropout_prob=0).state_dict()
    )
    x, c, t, ctx = torch.randn(2, 16, 128), torch.randn(2, 128), torch.tensor([3, 900]), torch.randn(2, 7, 16)
    with torch.no_grad():
        for block in model.blocks:  # adaLN-Zero gates and the zero cross-attention output: every block is the identity
            assert torch.equal(block(x, c, None, ctx), x)
    model = tiny_text_dit().eval()
    seen = []
    model.blocks[0].adaLN_modulation.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    xs = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a, b = model(xs, t, ctx), model(xs, t, ctx.flip(0))
        assert torch.equal(seen[0], model.t_embedder(t)) and torch.equal(seen[0], seen[1])  # adaLN sees t alone
        assert (a - b).abs().max() > 1e-3  # the text enters through cross-attention


def test_null_context_dropout_rate_and_forced_drops():
    null, ctx, mask = torch.randn(1, 8), torch.randn(20000, 3, 8), torch.rand(20000, 3) > 0.5
    torch.manual_seed(0)
    out, out_mask = dtr.drop_context(ctx, mask, null, 0.1)
    dropped = (out == null).all(-1).all(-1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # 5 standard deviations
    assert torch.equal(out[~dropped], ctx[~dropped]) and torch.equal(out_mask[~dropped], mask[~dropped])
    assert out_mask[dropped].all()  # a dropped row attends to L copies of the null token
    force = torch.arange(20000) % 3 == 0
    out, out_mask = dtr.drop_context(ctx, None, null, 0.5, force_drop_ids=force)
    assert torch.equal((out == null).all(-1).all(-1), force) and out_mask is None
    assert dtr.drop_context(ctx, mask, null, 0.0) == (ctx, mask)
    model = tiny_text_dit(class_dropout_prob=1.0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.randn(2, 6, 16)
    with torch.no_grad():
        uncond = model.eval()(x, t)  # y=None: the null context, i.e. unconditional
        assert torch.allclose(model.train()(x, t, y), uncond, atol=FORWARD_ATOL)  # every caption dropped in training
        assert (model.eval()(x, t, y) - uncond).abs().max() > 1e-3  # and none in eval mode
    with pytest.raises(ValueError, match="no null context"):
        tiny_text_dit(class_dropout_prob=0.0)(x, t)


def test_text_cfg_scale_one_is_conditional():
    model = tiny_text_dit().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    two = lambda v: torch.cat([v, v])
    with torch.no_grad():
        cond, uncond = model(x, t, y, context_mask=mask), model(x, t)
        out = model.forward_with_cfg(two(x), two(t), two(y), 1.0, context_mask=two(mask))
        assert torch.allclose(out[:2], cond, atol=FORWARD_ATOL) and torch.equal(out[:2, :4], out[2:, :4])
        g = model.forward_with_cfg(two(x), two(t), two(y), 4.0, context_mask=two(mask))
        guided = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])  # 9 forwards' errors, as for class labels
        assert torch.allclose(g[:2, :4], guided, atol=9 * FORWARD_ATOL)
        assert torch.allclose(g[:2, 4:], cond[:, 4:], atol=FORWARD_ATOL)  # learned sigma unguided
        assert (g[:2, :4] - cond[:, :4]).abs().max() > 1e-3


COCO = {
    "info": {},
    "licenses": [],
    "images": [{"id": 7, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}, {"id": 9, "file_name": "c.png"}],
    "annotations": [
        {"image_id": 3, "id": 1, "caption": "A dog  on a\nsofa. "},
        {"image_id": 7, "id": 2, "caption": "x"},
        {"image_id": 3, "id": 5, "caption": "two dogs"},
        {"image_id": 3, "id": 6, "caption": "a sofa"},
    ],
}


def test_coco_captions_parsing(tmp_path):
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(COCO))
    # images in file order, several captions each (whitespace normalised), images without captions left out
    assert dtr.read_coco_captions(str(path)) == [
        ("a.png", ["x"]),
        ("b.png", ["A dog on a sofa.", "two dogs", "a sofa"]),
    ]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: "{not json", "cannot read captions"),
        (lambda c: {"images": c["images"]}, "not a COCO captions file"),
        (lambda c: [c], "not a COCO captions file"),
        (lambda c: dict(c, images=c["images"] + [{"id": 11}]), r"images\[3\] needs an 'id' and a 'file_name'"),
        (lambda c: dict(c, images=c["images"] + [{"id": 3, "file_name": "d.png"}]), r"images\[3\] repeats image id 3"),
        (
            lambda c: dict(c, annotations=c["annotations"] + [{"image_id": 4, "caption": "y"}]),
            r"annotations\[4\] names image 4, which is not among the images",
        ),
        (
            lambda c: dict(c, annotations=c["annotations"] + [{"image_id": 3, "caption": " \n"}]),
            r"annotations\[4\] has an",
        ),
        (lambda c: dict(c, annotations=[{"image_id": 3, "caption": 5}]), r"annotations\[0\] needs an 'image_id' and a"),
        (lambda c: dict(c, annotations=[]), "holds no captions"),
    ],
)
def test_coco_captions_bad_entries(tmp_path, edit, message):
    path = tmp_path / "captions.json"
    bad = edit(json.loads(json.dumps(COCO)))
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ValueError, match=message) as e:
        dtr.read_coco_captions(str(path))
    assert "\n" not in str(e.value)


#################################################################################
#                      dtr.py: end to end and command line                      #
#################################################################################


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = dtr.DiT_models["DiT-T/2"](input_size=8, num_classes=4, routing="dtr")
    d = dtr.create_diffusion("", noise_schedule="cosine")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, y = torch.randn(8, 4, 8, 8).clamp(-1, 1), torch.arange(8) % 4
    t, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 4, 8, 8)
    losses = []
    for _ in range(30):
        loss = d.training_losses(model, x0, t, dict(y=y), noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_masks_cli_draws_the_table(tmp_path):
    from PIL import Image

    read_image = lambda p: torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
    out = tmp_path / "m.png"
    r = run_cli("masks", "--kind", "dtr", "--channels", "40", "--tasks", "30", "--out", str(out))
    assert r.returncode == 0, r.stderr
    img = read_image(str(out))  # (3, T, C)
    assert img.shape == (3, 30, 40)
    active = (img[0] > 128).float()  # yellow is bright in red, purple is not
    assert torch.equal(active, dtr.dtr_masks(30, 40))
    r = run_cli("masks", "--kind", "dtr", "--beta", "0", "--out", str(out))
    assert r.returncode != 0 and "beta" in r.stderr and img.shape == read_image(str(out)).shape  # old file intact


def write_run(folder, model, routing, records):
    """A train.py experiment folder as `dtr.py plot` reads it: args.json and metrics.jsonl."""
    os.makedirs(folder)
    (folder / "args.json").write_text(json.dumps({"model": model, "routing": routing, "lr": 1e-4}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    header = open(path, "rb").read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return tuple(int.from_bytes(header[i : i + 4], "big") for i in (16, 20))


def test_plot_draws_two_runs_one_panel_per_metric(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    train_records = lambda scale: [{"kind": "train", "step": s, "loss": scale / s} for s in range(100, 1001, 100)]
    evals = lambda fid_: [
        {"kind": "eval", "step": s, "metrics": {"fid": fid_ / s, "inception_score": s, "inception_score_std": 1}}
        for s in (500, 1000)
    ]
    dit = write_run(tmp_path / "000-DiT-B-2-none", "DiT-B/2", "none", train_records(2) + evals(9e4))
    dtr_run = write_run(tmp_path / "001-DiT-B-2-dtr", "DiT-B/2", "dtr", train_records(1) + evals(6e4)[:1])
    out = tmp_path / "curves.png"
    dtr.plot_main(argparse.Namespace(runs=[dit, dtr_run], out=str(out)))
    # loss, fid, inception_score (the std is a spread, not a metric): one row of three 5 x 4 inch panels at 100 dpi
    assert png_size(out) == (1500, 400)
    assert "loss, fid, inception_score of 2 run(s)" in capsys.readouterr().out
    image = np.array(Image.open(out).convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    assert dtr.plot_run(dtr_run)[0] == "DiT-B/2 dtr"  # each run labelled by its model and routing
    loss_only = write_run(tmp_path / "002", "DiT-B/2", "dtr", train_records(1))
    dtr.plot_main(argparse.Namespace(runs=[loss_only], out=str(out)))
    assert png_size(out) == (1000, 400)  # one panel, still 1000 pixels wide


def test_plot_smoothing_is_a_debiased_moving_average():
    w = dtr.PLOT_SMOOTHING
    assert dtr.smooth([4.0, 2.0]) == pytest.approx([4.0, (w * (1 - w) * 4 + (1 - w) * 2) / (1 - w**2)])
    assert dtr.smooth([3.0] * 5) == pytest.approx([3.0] * 5)  # no bias towards 0 at the start


@pytest.mark.slow
def test_plot_missing_or_garbled_metrics_is_one_line(tmp_path, monkeypatch):
    good = write_run(tmp_path / "good", "DiT-T/2", "dtr", [{"kind": "train", "step": 1, "loss": 1.0}])
    os.makedirs(tmp_path / "missing")
    (tmp_path / "missing" / "args.json").write_text(json.dumps({"model": "DiT-T/2", "routing": "dtr"}))
    garbled = write_run(tmp_path / "garbled", "DiT-T/2", "dtr", [{"kind": "train", "step": 1, "loss": 1.0}])
    with open(os.path.join(garbled, "metrics.jsonl"), "a") as f:
        f.write("not json\n")
    out = tmp_path / "c.png"
    for run, message in (
        (str(tmp_path / "missing"), "metrics.jsonl not found: train.py writes it"),
        (garbled, "garbled/metrics.jsonl line 2 is not a train.py metrics record"),
        (str(tmp_path / "nothing"), "no readable args.json with model and routing"),
    ):
        r = run_cli("plot", good, run, "--out", str(out))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("dtr.py: error: "), r.stderr
        assert message in r.stderr and not out.exists()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # matplotlib not installed
    with pytest.raises(SystemExit, match="dtr.py: error: dtr.py plot needs matplotlib: pip install matplotlib$"):
        dtr.main(argparse.Namespace(command="plot", runs=[good], out=str(out)))


TINY_BENCH = ("bench", "--model", "DiT-T/2", "--image-size", "8", "--batch-size", "2", "--warmup", "0")


@pytest.mark.slow
def test_bench_cli_reports_three_kinds():
    r = run_cli(*TINY_BENCH, "--steps", "6", "--routings", "none", "dtr-plain", "dtr")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {"none", "dtr-plain", "dtr"}
    assert all(float(rows[k].split()[1]) > 0 for k in rows) and "% vs none" in rows["dtr"]
    # 6 repetitions: the interval is (min, max) of the ratios, and the median lies in it
    med, lo, hi = map(
        float, re.search(r"([-+][\d.]+)% vs none  \(95% CI ([-+][\d.]+) to ([-+][\d.]+)%\)", rows["dtr"]).groups()
    )
    assert lo <= med <= hi


@pytest.mark.slow
def test_bench_train_mode_cli():
    r = run_cli(
        *TINY_BENCH,
        "--steps",
        "1",
        "--mode",
        "train",
        "--routings",
        "none",
        "dtr",
        "--precision",
        "bf16",
        "--threads",
        "1",
        "--clock",
        "cpu",
        "--weights",
        "random",
    )
    assert r.returncode == 0, r.stderr
    assert "weights random" in r.stdout.splitlines()[0]
    head, *lines = r.stdout.splitlines()
    assert "train" in head and "bf16" in head and "clock cpu" in head and "threads 1" in head
    gmacs = float(re.search(r"([\d.]+) GMACs/img", head)[1])  # printed to 4 significant digits: 5e-4 relative
    assert gmacs == pytest.approx(dtr.dit_gmacs(tiny_dit()), rel=1e-3)
    rows = {line.split()[0]: line for line in lines}
    assert list(rows) == ["none", "dtr"] and "% vs none" in rows["dtr"] and "CI" not in rows["dtr"]  # 1 repetition
    for row in rows.values():
        ms, img_s = (float(re.search(rf"([\d.]+) {unit}", row)[1]) for unit in ("ms/step", "img/s"))
        assert ms > 0 and img_s == pytest.approx(2 / (ms / 1000), rel=1e-2)
        assert float(re.search(r"peak RSS ([\d.]+) GiB", row)[1]) > 0  # CPU: the process' peak resident set
    r = run_cli("bench", "--device", "cuda", "--clock", "cpu")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--clock cpu" in r.stderr
    r = run_cli("bench", "--model", "ADM-T", "--routings", "none", "dtr-plain")  # ADM's blocks have one form
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "DiT's only" in r.stderr


def test_median_interval_takes_the_binomial_order_statistics():
    from scipy.stats import binom

    # n = 40 by hand: P(Bin(40, 1/2) <= 13) = 0.0192 (coverage 0.962), <= 14: 0.0403 (0.919), so x_(14) and x_(27)
    assert dtr.median_interval(list(range(40, 0, -1))) == (14, 27)
    assert dtr.median_interval([]) is None and dtr.median_interval([3.0] * 5) is None  # (min, max) covers 0.94
    for n in (5, 6, 9, 20, 41, 100):
        js = [j for j in range(1, n // 2 + 1) if 1 - 2 * binom.cdf(j - 1, n, 0.5) >= 0.95]
        assert dtr.median_interval(list(range(1, n + 1))) == ((max(js), n + 1 - max(js)) if js else None)
    # it covers the true median as often as the binomial says, whatever the distribution (here exponential: ln 2)
    samples = np.random.default_rng(0).exponential(size=(4000, 40))
    covered = np.mean([lo <= math.log(2) <= hi for lo, hi in map(dtr.median_interval, samples.tolist())])
    assert abs(covered - (1 - 2 * binom.cdf(13, 40, 0.5))) < 0.01


def test_dit_gmacs_match_dit_table_4():
    # Peebles & Xie, Tab. 4 (256x256 images, i.e. 32x32 latents): forward Gflops, which count multiply-accumulates
    for name, gflops in [
        ("DiT-S/2", 6.06),
        ("DiT-B/2", 23.01),
        ("DiT-L/2", 80.71),
        ("DiT-XL/2", 118.64),
        ("DiT-XL/4", 29.05),
        ("DiT-S/8", 0.36),
    ]:
        with torch.device("meta"):
            model = dtr.create_model(name, input_size=32, routing="none")
        assert dtr.dit_gmacs(model) == pytest.approx(gflops, rel=2e-3, abs=5e-3), name


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        dtr.atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    dtr.atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"


#################################################################################
#                                    train.py                                   #
#################################################################################


def test_train_demo_defaults_and_outputs(tmp_path):
    args = train.resolve_preset(train.parser().parse_args([]))
    assert (args.model, args.image_size, args.global_batch_size, args.lr, args.ema_decay) == (
        "DiT-T/2",
        16,
        64,
        2e-3,
        0.995,
    )
    paper = train.resolve_preset(train.parser().parse_args(["--data", "x"]))
    assert (
        paper.lr,
        paper.global_batch_size,
        paper.ema_decay,
        paper.weight_decay,
        paper.class_dropout_prob,
        paper.noise_schedule,
        paper.num_timesteps,
        paper.learn_sigma,
        paper.flip_prob,
    ) == (1e-4, 256, 0.9999, 0.0, 0.1, "cosine", 1000, True, 0.5)
    exp, ckpt = run_train(tmp_path, "--steps", "3", "--ckpt-every", "2")
    assert sorted(os.listdir(os.path.join(exp, "checkpoints"))) == ["0000002.pt", "0000003.pt"]
    assert (
        ckpt["step"] == 3
        and ckpt["args"]["num_classes"] == 6
        and set(ckpt) >= {"model", "ema", "opt", "rng", "model_args"}
    )
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = dtr.build_model(dtr.model_args(ckpt["args"]))
    model.load_state_dict(ckpt["ema"], strict=True)  # loadable as a plain DiT state dict
    log = open(os.path.join(exp, "log.txt")).read()
    assert "steps/s" in log and "t quarters" in log and json.load(open(os.path.join(exp, "args.json")))["lr"] == 2e-3
    grid = np.array(Image.open(os.path.join(exp, "samples_0000003.png")))
    tile = 8 * 8 + 1  # 8-pixel samples upscaled 8x (8 columns of 64 pixels: 512 wide), 1-pixel padding
    assert grid.shape == (6 * tile + 1, 8 * tile + 1, 3)  # one row per class, 8 columns


@pytest.mark.parametrize("size,factor", [(8, 8), (16, 4), (80, 1)])
def test_train_grid_is_upscaled_nearest_neighbour(tmp_path, monkeypatch, size, factor):
    samples = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (48, size, size, 3), dtype=np.uint8))
    calls = []

    def fake_generate(model, diffusion, labels, seeds, *rest, **kw):
        calls.append(labels)
        return samples[list(seeds)]

    monkeypatch.setattr(dtr, "generate", fake_generate)
    args = train.resolve_preset(train.parser().parse_args(["--grid-steps", "2", "--image-size", str(size)]))
    args.num_classes, args.context_dim = 6, None
    grid = np.array(Image.open(train.save_training_grid(args, str(tmp_path), 7, torch.nn.Identity(), None, "cpu")))
    tile = size * factor + 1  # the smallest integer factor that makes 8 columns at least 512 pixels wide
    assert grid.shape == (6 * tile + 1, 8 * tile + 1, 3) and 512 <= 8 * size * factor < 512 + 8 * size
    assert calls == [torch.arange(6).repeat_interleave(8).tolist()]  # a row per class
    assert (grid[::tile] == 0).all() and (grid[:, ::tile] == 0).all()  # 1-pixel black lines between the tiles
    for i, tile_image in enumerate(samples.numpy()):
        row, col = divmod(i, 8)
        block = grid[row * tile + 1 : (row + 1) * tile, col * tile + 1 : (col + 1) * tile]  # (S f, S f, 3)
        assert (
            block.reshape(size, factor, size, factor, 3) == tile_image[:, None, :, None]
        ).all()  # f x f constant blocks


def test_train_shapes_data_is_deterministic_and_classed():
    a, la = train.make_shapes(3, 16, seed=0)
    b, lb = train.make_shapes(3, 16, seed=0)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == torch.uint8 and a.shape == (18, 3, 16, 16)
    # each class is drawn in its own colour: the brightest channel of the shape pixels
    for k, rgb in enumerate(train.SHAPE_COLORS):
        img = a[la == k][0].float()
        fg = (img - img[:, :1, :1]).abs().sum(0) > 60
        assert (img[:, fg].mean(1) - torch.tensor(rgb)).abs().max() < 60
        assert fg.sum() >= 16 and not (fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())  # in frame


def test_train_ema_update_formula():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    train.update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)


def test_train_resume_is_bit_exact(tmp_path):
    _, full = run_train(tmp_path, "--steps", "4", "--ckpt-every", "2", name="full")
    half = os.path.join(str(tmp_path / "full"), "000-DiT-T-2-dtr", "checkpoints", "0000002.pt")
    os.makedirs(tmp_path / "re" / "000-x" / "checkpoints")
    resume_from = str(tmp_path / "re" / "000-x" / "checkpoints" / "0000002.pt")
    open(resume_from, "wb").write(open(half, "rb").read())
    _, resumed = run_train(tmp_path, "--steps", "4", "--ckpt-every", "2", "--resume", resume_from, name="re")
    assert resumed["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])
    assert torch.equal(full["opt"]["state"][0]["exp_avg_sq"], resumed["opt"]["state"][0]["exp_avg_sq"])
    with pytest.raises(SystemExit, match="routing is 'dtr' there but 'random' now"):
        run_train(tmp_path, "--steps", "5", "--routing", "random", "--resume", resume_from, name="re")


def adamw_step(p, m, v, step, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """p after an AdamW step (Loshchilov & Hutter, torch's defaults) whose updated moments are m, v: float64."""
    m_hat, v_hat = m.double() / (1 - betas[0] ** step), v.double() / (1 - betas[1] ** step)
    return p.double() * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)


def test_train_resume_applies_optimiser_flags(tmp_path):
    exp, before = run_train(tmp_path, "--steps", "2", "--ckpt-every", "2", "--loss-weight", "ant-uw")
    assert [(g["lr"], g["weight_decay"]) for g in before["opt"]["param_groups"]] == [(2e-3, 0.0), (0.025, 0.0)]
    flags = ["--lr", "4e-3", "--weight-decay", "0.1", "--uw-lr", "0.05", "--ema-decay", "0.5"]
    run_train(
        tmp_path,
        "--steps",
        "3",
        "--loss-weight",
        "ant-uw",
        *flags,
        "--resume",
        os.path.join(exp, "checkpoints", "0000002.pt"),
    )
    after = torch.load(os.path.join(exp, "checkpoints", "0000003.pt"), weights_only=False)
    groups = after["opt"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(4e-3, 0.1), (0.05, 0.0)]
    # step 3 used them: AdamW from the saved moments, lr 4e-3 and weight decay 0.1 (the ANT-UW group: 0.05, none)
    model = dtr.build_model(dtr.model_args(after["args"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimiser's indices, in order
    state = after["opt"]["state"]
    for i in (0, len(names) - 1):
        m, v = state[i]["exp_avg"], state[i]["exp_avg_sq"]
        new = adamw_step(before["model"][names[i]], m, v, 3, lr=4e-3, weight_decay=0.1)
        old = adamw_step(before["model"][names[i]], m, v, 3, lr=2e-3, weight_decay=0.0)
        assert torch.allclose(after["model"][names[i]].double(), new, rtol=0, atol=1e-6), names[i]
        assert not torch.allclose(new, old, rtol=0, atol=1e-4)
    uw = adamw_step(
        before["uw"], state[len(names)]["exp_avg"], state[len(names)]["exp_avg_sq"], 3, lr=0.05, weight_decay=0.0
    )
    assert torch.allclose(after["uw"].double(), uw, rtol=0, atol=1e-6)
    for k in names:  # EMA decay 0.5
        assert torch.allclose(after["ema"][k], 0.5 * before["ema"][k] + 0.5 * after["model"][k], atol=1e-7), k
    log = open(os.path.join(exp, "log.txt")).read()
    changed = [line for line in log.splitlines() if "changed on resume:" in line]
    assert len(changed) == 1 and all(
        f in changed[0]
        for f in (
            "--lr 0.004 (was 0.002)",
            "--weight-decay 0.1 (was 0.0)",
            "--uw-lr 0.05 (was 0.025)",
            "--ema-decay 0.5 (was 0.995)",
            "--steps 3 (was 2)",
        )
    )


@pytest.fixture(scope="module")
def resume_ckpts(tmp_path_factory):
    """Step-2 checkpoints of a tiny ANT-UW run and of a tiny constant-weight run, by --loss-weight."""
    root = tmp_path_factory.mktemp("resume")
    runs = {
        w: run_train(root, "--steps", "2", "--ckpt-every", "2", "--loss-weight", w, name=w)[0]
        for w in ("ant-uw", "constant")
    }
    return {w: os.path.join(exp, "checkpoints", "0000002.pt") for w, exp in runs.items()}


@pytest.mark.parametrize(
    "weight,flags,message",
    [
        ("ant-uw", ["--seed", "1"], "seed is 0 there but 1 now"),
        ("ant-uw", ["--global-batch-size", "16"], "global_batch_size is 8 there but 16 now"),
        ("ant-uw", ["--flip-prob", "0"], "flip_prob is 0.5 there but 0.0 now"),
        ("ant-uw", ["--demo-images-per-class", "5"], "demo_images_per_class is 4 there but 5 now"),
        ("ant-uw", ["--uw-clusters", "4"], "uw_clusters is 8 there but 4 now"),
        ("ant-uw", ["--loss-weight", "constant"], "loss_weight is 'ant-uw' there but 'constant' now"),  # ANT-UW off
        ("constant", ["--loss-weight", "ant-uw"], "loss_weight is 'constant' there but 'ant-uw' now"),  # ANT-UW on
        ("constant", ["--min-snr-gamma", "3"], "min_snr_gamma is 5.0 there but 3.0 now"),
        ("constant", ["--p2-gamma", "0.5"], "p2_gamma is 1.0 there but 0.5 now"),
        ("constant", ["--p2-k", "2"], "p2_k is 1.0 there but 2.0 now"),
        ("constant", ["--class-dropout-prob", "0.2"], "class_dropout_prob is 0.1 there but 0.2 now"),
    ],
)
def test_train_resume_refuses_data_and_loss_changes(resume_ckpts, tmp_path, weight, flags, message):
    path = resume_ckpts[weight]
    with pytest.raises(SystemExit, match=re.escape(f"--resume {path}: {message}")) as e:
        run_train(tmp_path, "--steps", "3", "--loss-weight", weight, *flags, "--resume", path)
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()  # one line, before anything is written


def test_train_resume_auto_takes_the_newest_run_of_the_same_model(tmp_path):
    def ckpt(exp, step):
        return os.path.join(exp, "checkpoints", f"{step:07d}.pt")

    dtr_exp, _ = run_train(tmp_path, "--steps", "2", "--ckpt-every", "2")
    random_exp, _ = run_train(tmp_path, "--steps", "2", "--ckpt-every", "2", "--routing", "random")  # newer
    exp, _ = run_train(tmp_path, "--steps", "3", "--resume", "auto")
    assert exp == dtr_exp and torch.load(ckpt(exp, 3), weights_only=False)["step"] == 3
    assert not os.path.exists(ckpt(random_exp, 3))
    exp, _ = run_train(tmp_path, "--steps", "1", "--resume", "auto", "--beta", "0.5")  # no run of this model yet
    assert exp not in (dtr_exp, random_exp) and len(os.listdir(tmp_path / "r")) == 3
    assert "experiment " in open(os.path.join(exp, "log.txt")).read()


def test_train_fp16_resume_restores_the_grad_scaler(tmp_path):
    flags = ["--steps", "4", "--ckpt-every", "2", "--precision", "fp16"]
    exp, full = run_train(tmp_path, *flags)
    path = os.path.join(exp, "checkpoints", "0000002.pt")
    half = torch.load(path, weights_only=False)
    assert half["scaler"]["scale"] == 2.0**16 and half["scaler"]["_growth_tracker"] == 2  # 2 steps, no overflow
    _, resumed = run_train(tmp_path, *flags, "--resume", path)  # step 4 again, in a new experiment
    assert resumed["scaler"] == full["scaler"]
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    half["scaler"]["scale"] = 1024.0  # a scale that overflows brought down: kept, not reset to 2**16
    torch.save(half, path)
    _, after = run_train(tmp_path, "--steps", "3", "--precision", "fp16", "--resume", path)
    assert after["step"] == 3 and (after["scaler"]["scale"], after["scaler"]["_growth_tracker"]) == (1024.0, 3)


def md5_of_files(folder):
    """{relative path: md5} of every file under folder."""
    import hashlib

    return {
        os.path.relpath(os.path.join(d, f), folder): hashlib.md5(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(folder)
        for f in files
    }


def test_train_resume_from_an_older_checkpoint_starts_a_new_experiment(tmp_path):
    exp, _ = run_train(tmp_path, "--steps", "4", "--ckpt-every", "2")
    before = md5_of_files(exp)
    older = os.path.join(exp, "checkpoints", "0000002.pt")
    new, ckpt = run_train(tmp_path, "--steps", "4", "--ckpt-every", "2", "--resume", older, "--lr", "0.01")
    assert md5_of_files(exp) == before  # 0000004.pt, log.txt, args.json: byte for byte as they were
    assert new != exp and os.path.basename(new) == "001-DiT-T-2-dtr" and ckpt["step"] == 4
    assert sorted(os.listdir(os.path.join(new, "checkpoints"))) == ["0000004.pt"]
    assert json.load(open(os.path.join(new, "args.json")))["resumed_from"] == os.path.abspath(older)
    log = open(os.path.join(new, "log.txt")).read()
    assert f"resuming {older} at step 2 in a new experiment {new}" in log and "--lr 0.01 (was 0.002)" in log
    newest = os.path.join(new, "checkpoints", "0000004.pt")  # the newest checkpoint continues its experiment
    again, ckpt = run_train(tmp_path, "--steps", "5", "--ckpt-every", "2", "--resume", newest)
    assert again == new and ckpt["step"] == 5 and len(os.listdir(tmp_path / "r")) == 2


def test_train_resume_from_a_copied_checkpoint_trains_and_saves(tmp_path, monkeypatch):
    exp, _ = run_train(tmp_path, "--steps", "2", "--ckpt-every", "2")
    monkeypatch.chdir(tmp_path)
    with open("ck.pt", "wb") as f:  # a copy outside any experiment, named by a relative path
        f.write(open(os.path.join(exp, "checkpoints", "0000002.pt"), "rb").read())
    new, ckpt = run_train(tmp_path, "--steps", "3", "--resume", "ck.pt")
    assert os.path.dirname(new) == str(tmp_path / "r") and new != exp and ckpt["step"] == 3
    assert os.path.isfile(os.path.join(new, "checkpoints", "0000003.pt"))
    assert json.load(open(os.path.join(new, "args.json")))["resumed_from"] == str(tmp_path / "ck.pt")
    assert "resuming ck.pt at step 2 in a new experiment" in open(os.path.join(new, "log.txt")).read()


def test_train_resume_refuses_changed_data_in_one_line(tmp_path):
    data = tmp_path / "imgs"
    write_images(data / "a", 5)
    write_images(data / "b", 5)
    flags = ["--data", str(data), "--model", "DiT-T/2", "--num-workers", "0", "--steps", "2", "--ckpt-every", "2"]
    exp, ckpt = run_train(tmp_path, *flags)
    assert ckpt["args"]["data_source"]["count"] == 10  # the source is recorded
    path = os.path.join(exp, "checkpoints", "0000002.pt")
    before = md5_of_files(tmp_path / "r")
    resume = [*flags[:-4], "--steps", "3", "--resume", path]
    write_images(data / "b", 6)  # one image more
    with pytest.raises(
        SystemExit,
        match=r"--resume .*: it trained on .*imgs \(10 images, digest \w+\) but the data is now .*imgs \(11 images",
    ) as e:
        run_train(tmp_path, *resume)
    assert "\n" not in str(e.value)
    os.remove(data / "b" / "5.png")
    os.rename(data / "b" / "4.png", data / "b" / "9.png")  # as many images, another one
    with pytest.raises(SystemExit, match=r"\(10 images, digest \w+\) but the data is now .*\(10 images, digest"):
        run_train(tmp_path, *resume)
    assert md5_of_files(tmp_path / "r") == before  # refused before anything was written
    os.rename(data / "b" / "9.png", data / "b" / "4.png")
    unrecorded = torch.load(path, weights_only=False)
    del unrecorded["args"]["data_source"]  # a checkpoint that records no data source: resumes, unchecked, and says so
    torch.save(unrecorded, path)
    new, ckpt = run_train(tmp_path, *resume)
    assert (
        ckpt["step"] == 3
        and "records no data source: the data is not checked" in open(os.path.join(new, "log.txt")).read()
    )


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--steps", "0"),
        ("--global-batch-size", "0"),
        ("--log-every", "0"),
        ("--ckpt-every", "0"),
        ("--sample-every", "-1"),
        ("--latent-shard-size", "0"),
        ("--latent-shard-size", "-4"),
        ("--demo-images-per-class", "0"),
        ("--num-workers", "-1"),
        ("--image-size", "0"),
        ("--num-timesteps", "0"),
        ("--lr", "-0.1"),
        ("--lr", "nan"),
        ("--weight-decay", "-1"),
        ("--uw-lr", "-1"),
        ("--ema-decay", "1.5"),
        ("--flip-prob", "-0.5"),
        ("--class-dropout-prob", "1"),
        ("--grid-steps", "0"),
    ],
)
def test_train_zero_and_negative_sizes_are_refused_before_training(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=re.escape(flag) + " (is|.* must be)") as e:
        run_train(tmp_path, "--steps", "2", flag, value)
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()


def test_train_sample_every_zero_still_means_a_grid_at_the_end(tmp_path):
    exp, _ = run_train(tmp_path, "--steps", "2", "--ckpt-every", "2", "--sample-every", "0")
    assert [f for f in os.listdir(exp) if f.startswith("samples_")] == ["samples_0000002.png"]


def test_read_checkpoint_loads_the_legacy_format_and_resumes(resume_ckpts, tmp_path):
    ckpt = torch.load(resume_ckpts["constant"], weights_only=False)
    legacy = str(tmp_path / "legacy.pt")
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    assert open(legacy, "rb").read(4) != b"PK\x03\x04"  # not a zip: torch.load(mmap=True) refuses it
    with pytest.raises(RuntimeError):
        torch.load(legacy, mmap=True, weights_only=False)
    read = dtr.read_checkpoint(legacy)
    assert read["step"] == 2 and all(torch.equal(read["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    _, resumed = run_train(tmp_path, "--steps", "3", "--loss-weight", "constant", "--resume", legacy)
    assert resumed["step"] == 3


def test_train_experiment_numbers_sort_as_numbers_not_strings(tmp_path):
    model_args = {**dict.fromkeys(dtr.MODEL_ARGS, 1), "model": "DiT-T/2", "routing": "dtr"}
    args = argparse.Namespace(results_dir=str(tmp_path), **model_args)
    for name, steps in (("999-DiT-T-2-dtr", (5,)), ("1000-DiT-T-2-dtr", (9_999_999, 10_000_000)), ("notes", ())):
        os.makedirs(tmp_path / name / "checkpoints")
        json.dump(model_args, open(tmp_path / name / "args.json", "w"))
        for step in steps:
            open(tmp_path / name / "checkpoints" / f"{step:07d}.pt", "wb").close()
    newest = str(tmp_path / "1000-DiT-T-2-dtr" / "checkpoints" / "10000000.pt")
    assert train.latest_checkpoint(str(tmp_path)) == newest and train.latest_checkpoint(str(tmp_path), args) == newest
    assert os.path.basename(train.new_experiment_dir(args)) == "1001-DiT-T-2-dtr"  # not 003: one above the largest


@pytest.mark.slow
def test_train_two_processes_match_one(tmp_path):
    args = [*TINY_TRAIN, "--steps", "3", "--ckpt-every", "3", "--loss-weight", "ant-uw", "--global-batch-size", "16"]
    r = torchrun(*args, "--results-dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), *args, "--results-dir", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-2000:]
    a = torch.load(train.latest_checkpoint(str(tmp_path / "one")), weights_only=False)
    b = torch.load(train.latest_checkpoint(str(tmp_path / "two")), weights_only=False)
    assert len(b["rng"]) == 2 and b["uw"].abs().sum() > 0  # every rank's RNG saved; ANT-UW log-variances trained
    assert torch.allclose(a["uw"], b["uw"], atol=1e-6)
    for k in a["model"]:  # same global batch, same per-sample draws: equal up to the order of float sums
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k
    per_rank_bad = torchrun(
        *TINY_TRAIN, "--loss-weight", "ant-uw", "--steps", "1", "--results-dir", str(tmp_path / "bad")
    )
    assert per_rank_bad.returncode != 0 and "per-rank batch 4 is not divisible by the 8 ANT-UW" in per_rank_bad.stderr


@pytest.mark.slow
def test_train_torchrun_names_the_unreadable_image_of_rank_1(tmp_path):
    # --latents, 5 images a shard: rank 1 encodes shards 1 and 3 (images 5-9, 15-19 of 24). Image 5 (c0/010.png, the
    # 6th of the class folders in order) keeps a valid header and loses its data, so rank 1 alone meets it.
    images, vae = write_noise_images(tmp_path / "images"), tiny_vae(tmp_path / "vae")
    bad = os.path.join(images, "c0", "010.png")
    with open(bad, "rb") as f:
        header = f.read(100)
    with open(bad, "wb") as f:
        f.write(header)
    flags = ["--data", images, "--model", "DiT-T/2", "--num-workers", "0", "--image-size", "32", "--vae", "ema",
             "--vae-path", vae, "--latent-shard-size", "5", "--steps", "2", "--latents", str(tmp_path / "cache")]  # fmt: skip
    r = torchrun(*TINY_TRAIN, *flags, "--results-dir", str(tmp_path / "res"), timeout=120)  # no rank waits forever
    assert r.returncode != 0
    # one line, from rank 1 (rank 0's progress bar may precede it on the same console line)
    assert re.findall(r"train\.py: error: (rank \d+: cannot read image \S+): ", r.stderr) == [
        f"rank 1: cannot read image {bad}"
    ], r.stderr[-3000:]


def random_start(tmp_path, *flags):
    """--init-from weights for a tiny demo run: random everywhere (no zero-initialised layer), so that the first step
    has a gradient in every tensor."""
    args = train.resolve_preset(train.parser().parse_args([*TINY_TRAIN, *flags]))
    args.num_classes, args.context_dim = len(train.SHAPES), None
    path = str(tmp_path / "random.pt")
    torch.save(randomize(dtr.build_model(dtr.model_args(args))).state_dict(), path)
    return path


def assert_same_first_step(a, b, grad_tol):
    """Two checkpoints one AdamW step (lr 2e-3, no weight decay) from the same weights: their gradients (read from
    AdamW's first moment m = 0.1 g) agree to grad_tol of each tensor's largest, and so do their weights to what AdamW
    makes of that gradient difference.

    The first step moves w by lr g / (|g| + eps), which moves by at most lr |g - g'| / (min(|g|, |g'|) + eps) when g
    becomes g'; on top of that a few roundings of the update (lr 2^-21) and of w (|w| 2^-22)."""
    lr, eps = a["opt"]["param_groups"][0]["lr"], 1e-8
    model = dtr.build_model(dtr.model_args(a["args"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimiser's indices, in order
    pairs = [(a["model"][k], b["model"][k], a["opt"]["state"][i], b["opt"]["state"][i]) for i, k in enumerate(names)]
    if a["uw"] is not None:
        pairs.append((a["uw"], b["uw"], a["opt"]["state"][len(pairs)], b["opt"]["state"][len(pairs)]))
    for wa, wb, sa, sb in pairs:
        ma, mb = sa["exp_avg"].double(), sb["exp_avg"].double()  # 0.1 g
        assert (ma - mb).abs().max() <= grad_tol * ma.abs().max() and ma.abs().max() > 0
        bound = lr * (ma - mb).abs() / (torch.minimum(ma.abs(), mb.abs()) + 0.1 * eps) + lr * 2**-21
        assert ((wa.double() - wb.double()).abs() <= bound + wa.double().abs() * 2**-22).all()


# float32 gradients of these tiny runs are sums of at most 16 samples x 16 tokens = 256 products; summed in another
# order they agree to 2 * 256 * 2^-24 (3e-5) of the terms' magnitude, taken as the tensor's largest gradient. Under
# fp16 autocast a weight's gradient is rounded to fp16 (2^-11) once per micro-batch and once for the whole batch: 5
# roundings for 4 micro-batches.
ACCUM_GRAD_TOL = {"fp32": 2 * 256 * 2**-24, "fp16": 5 * 2**-11}


@pytest.mark.parametrize("weight,precision", [("constant", "fp32"), ("ant-uw", "fp32"), ("ant-uw", "fp16")])
def test_train_grad_accum_step_is_the_whole_batch_step(tmp_path, weight, precision):
    flags = ["--steps", "1", "--global-batch-size", "16", "--loss-weight", weight, "--precision", precision]
    flags += ["--init-from", random_start(tmp_path)]
    exp, one = run_train(tmp_path, *flags, name="one")
    exp4, four = run_train(tmp_path, *flags, "--grad-accum", "4", name="four")  # ANT-UW: 4 of the 8 clusters each
    assert_same_first_step(one, four, ACCUM_GRAD_TOL[precision])
    if precision == "fp16":  # the same loss-scale decisions: no overflow, one growth count
        assert one["scaler"] == four["scaler"] and four["scaler"]["_growth_tracker"] == 1
    norms = [float(re.search(r"grad norm (\S+)", open(os.path.join(e, "log.txt")).read())[1]) for e in (exp, exp4)]
    assert norms[0] == pytest.approx(norms[1], rel=ACCUM_GRAD_TOL[precision], abs=1e-4)  # logged to 4 decimals


class SyncSpy(torch.nn.Module):
    """A model wrapper with DDP's no_sync(): records, for every forward, whether it ran inside no_sync."""

    def __init__(self, model):
        super().__init__()
        self.model, self.syncing, self.calls = model, True, []

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        yield
        self.syncing = True

    def forward(self, *a, **kw):
        self.calls.append(self.syncing)
        return self.model(*a, **kw)


def tiny_train_state(*flags):
    """(args, run, state, diffusion, x, draws, kwargs) of a tiny demo run's first step, weights randomised."""
    args = train.resolve_preset(train.parser().parse_args([*TINY_TRAIN, "--global-batch-size", "16", *flags]))
    run = train.setup(args)
    data = train.load_training_data(args, run)
    state = train.init_state(args, run)
    randomize(state.model)
    diffusion = dtr.build_diffusion(dtr.model_args(args), **train.loss_weighting(args))
    draws = train.step_randomness(args, 0, run)
    batch = torch.utils.data.default_collate([data.dataset[i] for i in range(16)])
    return (args, run, state, diffusion, *train.model_inputs(args, run, data, None, batch, draws), draws)


def test_train_grad_accum_syncs_once_and_returns_every_loss():
    results = {}
    for accum in (1, 4):  # from the same weights, draws and ANT-UW log-variances (0)
        args, run, state, diffusion, x, kwargs, draws = tiny_train_state("--loss-weight", "ant-uw")
        args.grad_accum = accum
        spy = SyncSpy(state.model)
        results[accum] = train.train_step(args, run, spy, diffusion, state, x, draws, kwargs)
        assert spy.calls == [False] * (accum - 1) + [True]  # DDP all-reduces in the last backward only
    (losses, loss, _), (losses4, loss4, _) = results[1], results[4]
    assert losses4.shape == (16,) and torch.allclose(losses4, losses, rtol=1e-6, atol=0)  # each sample's loss
    # the minimised loss is ANT-UW's over the whole batch (cluster means of 2 samples, uw still 0 at the first step)
    k = dtr.cluster_index(draws["t"], 8, args.num_timesteps)
    by_hand = sum(0.5 * losses4[k == c].mean() / 8 for c in range(8))
    assert loss4.item() == pytest.approx(by_hand.item(), rel=1e-6) and loss4.item() == pytest.approx(
        loss.item(), rel=1e-6
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_train_max_grad_norm_clips_and_logs_the_unscaled_norm(precision):
    args, run, state, diffusion, x, kwargs, draws = tiny_train_state("--precision", precision)
    start = copy.deepcopy(state.model.state_dict())
    _, _, norm = train.train_step(args, run, state.model, diffusion, state, x, draws, kwargs)
    params = [p for p in state.model.parameters() if p.requires_grad]
    grads = [p.grad.double().clone() for p in params]  # kept after the step: unscaled, unclipped
    assert norm.item() == pytest.approx(math.sqrt(sum((g**2).sum().item() for g in grads)), rel=1e-5)
    assert 0.1 < norm.item() < 100  # of the order of a loss gradient, not scaled by fp16's 2^16
    args.max_grad_norm = clip = norm.item() / 4
    state.model.load_state_dict(start)
    _, _, clipped_norm = train.train_step(args, run, state.model, diffusion, state, x, draws, kwargs)
    assert clipped_norm.item() == pytest.approx(norm.item(), rel=ACCUM_GRAD_TOL[precision])  # reported before clipping
    for g, p in zip(grads, params):  # scaled by clip / norm (torch adds 1e-6 to the norm)
        assert torch.allclose(p.grad.double(), g * clip / (norm.item() + 1e-6), rtol=0, atol=1e-6 * g.abs().max())


@pytest.mark.slow
def test_train_grad_accum_on_two_ranks_is_the_one_rank_step(tmp_path):
    flags = [*TINY_TRAIN, "--steps", "1", "--global-batch-size", "16", "--loss-weight", "ant-uw"]
    flags += ["--init-from", random_start(tmp_path)]
    r = torchrun(*flags, "--grad-accum", "4", "--results-dir", str(tmp_path / "two"))  # 2 samples per micro-batch
    assert r.returncode == 0, r.stderr[-2000:]
    _, one = run_train(tmp_path, *flags[len(TINY_TRAIN) :], name="one")
    two = torch.load(train.latest_checkpoint(str(tmp_path / "two")), weights_only=False)
    assert_same_first_step(one, two, ACCUM_GRAD_TOL["fp32"])


def test_train_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    exp, _ = run_train(tmp_path, "--steps", "2", "--ckpt-every", "2")
    path = os.path.join(exp, "checkpoints", "0000002.pt")
    good = open(path, "rb").read()

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt  # killed mid-save

    monkeypatch.setattr(torch, "save", crash)
    args = train.parser().parse_args([*TINY_TRAIN, "--steps", "2"])
    args = argparse.Namespace(**{**vars(train.resolve_preset(args)), "num_classes": 6})
    model = dtr.build_model(dtr.model_args(args))
    state = train.State(
        model, model, torch.optim.AdamW(model.parameters()), None, torch.amp.GradScaler("cpu", enabled=False), 2
    )
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(args, train.Run(0, 1, torch.device("cpu"), slice(None)), exp, state)
    assert open(path, "rb").read() == good and os.listdir(os.path.dirname(path)) == ["0000002.pt"]


def test_train_nan_loss_stops_and_keeps_last_good(tmp_path):
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at step \d+; stopped"):
        run_train(tmp_path, "--steps", "20", "--ckpt-every", "1", "--lr", "1e30", "--fixed-sigma")
    ckpts = sorted(glob_ckpts(tmp_path))
    last = torch.load(ckpts[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_train_loader_error_without_a_message_is_one_line(tmp_path, monkeypatch):
    def broken(self, i):
        raise RuntimeError()  # str(e) == ""

    monkeypatch.setattr(train.ImageData, "__getitem__", broken)
    with pytest.raises(SystemExit, match=r"error: cannot load a batch \(RuntimeError\)$"):
        run_train(tmp_path, "--steps", "1")


def glob_ckpts(tmp_path):
    import glob

    return glob.glob(str(tmp_path / "r" / "*" / "checkpoints" / "*.pt"))


def test_train_image_folder_and_npz(tmp_path):
    write_images(tmp_path / "imgs" / "cats", 5)
    write_images(tmp_path / "imgs" / "dogs", 5)
    _, ckpt = run_train(
        tmp_path,
        "--data",
        str(tmp_path / "imgs"),
        "--steps",
        "1",
        "--ckpt-every",
        "1",
        "--model",
        "DiT-T/2",
        "--num-workers",
        "0",
        "--steps",
        "1",
        "--log-every",
        "1",
    )
    assert ckpt["args"]["num_classes"] == 2
    data, classes = train.load_data(argparse.Namespace(data=str(tmp_path / "imgs"), image_size=8, unconditional=True))
    assert classes == 1 and data[7][1] == 0 and data[0][0].shape == (3, 8, 8)
    images = np.random.default_rng(0).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images, np.arange(9) % 3)
    data, classes = train.load_data(argparse.Namespace(data=str(tmp_path / "d.npz"), image_size=8, unconditional=False))
    assert classes == 3 and torch.equal(data[4][0], torch.from_numpy(images[4]).permute(2, 0, 1)) and data[4][1] == 1


def test_train_center_crop_like_adm():
    from PIL import Image as I

    img = I.fromarray(np.arange(64 * 40 * 3, dtype=np.uint8).reshape(40, 64, 3) % 251)
    out = train.center_crop(img, 8)  # 40 -> 20 -> 10 (box), then bicubic to 8 on the short side, center crop
    small = img.resize((32, 20), I.BOX).resize((16, 10), I.BOX).resize((13, 8), I.BICUBIC)
    assert torch.equal(out, torch.from_numpy(np.asarray(small)[:, 2:10].copy()).permute(2, 0, 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,message",
    [
        ("empty", "no images found"),
        ("corrupt", "cannot read image"),
        ("npz_dtype", "arr_0 must be non-empty uint8"),
        ("size", "not divisible by 2"),
        ("missing", "does not exist"),
        ("small", "fewer than one global batch"),
        ("beta", "activation ratio beta=0.005 leaves none of 128 channels active"),
        ("clusters", "--uw-clusters 8 must be between 1 and --num-timesteps 4"),
        ("grid", "--grid-steps 8 must be between 1 and --num-timesteps 4"),
        ("foreign", "is not a train.py checkpoint (to start from its weights: --init-from)"),
        ("latents", "--latents stores VAE latents: it needs --vae"),
        ("accum", "per-rank batch 8 is not divisible into --grad-accum 3 micro-batches"),
        ("clip", "--max-grad-norm 0.0 must be positive"),
    ],
)
def test_train_bad_input_one_line(tmp_path, case, message):
    data = str(tmp_path / "data")
    extra = ["--data", data, "--num-workers", "0", "--model", "DiT-T/2"]
    if case == "empty":
        os.makedirs(os.path.join(data, "a"))
    elif case == "corrupt":
        write_images(os.path.join(data, "a"), 8)
        open(os.path.join(data, "a", "3.png"), "wb").write(b"not a png")
    elif case == "npz_dtype":
        data += ".npz"
        np.savez(data, np.zeros((4, 8, 8, 3), np.float32))
        extra[1] = data
    elif case == "size":
        extra = ["--image-size", "9"]
    elif case == "small":
        extra = ["--demo-images-per-class", "1"]
    elif case == "beta":
        extra = ["--beta", "0.005"]  # int(0.005 * 128) = 0
    elif case == "clusters":
        extra = ["--loss-weight", "ant-uw", "--num-timesteps", "4"]
    elif case == "grid":
        extra = ["--num-timesteps", "4", "--grid-steps", "8"]
    elif case == "foreign":  # a bare state dict, e.g. facebookresearch/DiT's
        torch.save(dtr.DiT_models["DiT-T/2"](input_size=8).state_dict(), tmp_path / "bare.pt")
        extra = ["--resume", str(tmp_path / "bare.pt")]
    elif case == "latents":
        extra = ["--latents", data]
    elif case in ("accum", "clip"):
        extra = ["--grad-accum", "3"] if case == "accum" else ["--max-grad-norm", "0"]
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "train.py"),
            *TINY_TRAIN,
            "--steps",
            "1",
            "--results-dir",
            str(tmp_path / "res"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and message in r.stderr
    lines = [line for line in r.stderr.replace("\r", "\n").splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:"), r.stderr  # one line (besides the bar)
    if case in ("beta", "clusters", "grid", "accum", "clip"):  # found before any training
        assert not (tmp_path / "res").exists()


def test_train_latent_mode_with_a_tiny_vae(tmp_path, monkeypatch):
    vae = dtr.load_vae("ema", tiny_vae(tmp_path / "vae"))
    seen, real = [], dtr.GaussianDiffusion.training_losses

    def spy(self, model, x_start, *rest, **kw):  # the latents the model is trained on
        seen.append(x_start.detach().clone())
        return real(self, model, x_start, *rest, **kw)

    monkeypatch.setattr(dtr.GaussianDiffusion, "training_losses", spy)
    _, ckpt = run_train(
        tmp_path,
        "--vae",
        "ema",
        "--vae-path",
        str(tmp_path / "vae"),
        "--image-size",
        "32",
        "--steps",
        "1",
        "--ckpt-every",
        "1",
    )
    assert (
        ckpt["model"]["x_embedder.proj.weight"].shape[1] == 4 and ckpt["model"]["pos_embed"].shape[1] == 4
    )  # 4x4 latents
    # step 0 by hand: the first global batch of epoch 0 (a permutation seeded by seed * 2**20 + epoch), then the
    # step's draws from a generator seeded by seed * 2**32 + step: timesteps, noise, flips, label drops, posterior
    images, _ = train.make_shapes(4, 32, seed=0)  # (24, 3, 32, 32) uint8
    index = torch.randperm(24, generator=torch.Generator().manual_seed(0))[:8]
    g = torch.Generator().manual_seed(0)
    dtr.sample_timesteps(8, 1000, None, "cpu", g), torch.randn(8, 4, 4, 4, generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    torch.rand(8, generator=g)
    eps = torch.randn(8, 4, 4, 4, generator=g)
    x = images[index].float() / 127.5 - 1
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    with torch.no_grad():
        post = vae.eval().encode(x).latent_dist
    assert post.std.min() > 0.1  # the draw matters
    assert torch.allclose(seen[0], (post.mean + post.std * eps) * 0.18215, rtol=0, atol=1e-6)
    with pytest.raises(dtr.InputError, match="cannot load the VAE"):
        dtr.load_vae("ema", str(tmp_path / "nowhere"))


def test_train_preset_is_the_papers_latent_space_for_dits():
    def resolve(*argv):
        return train.resolve_preset(train.parser().parse_args(list(argv)))

    paper = resolve("--data", "x")
    assert (paper.model, paper.image_size, paper.vae) == ("DiT-L/2", 256, "ema")  # DiT-L/2 on 32x32x4 latents
    assert resolve("--data", "x", "--vae", "none").vae is None  # pixels, said explicitly
    assert resolve("--data", "x", "--vae", "mse").vae == "mse"
    assert resolve("--data", "x", "--model", "DiT-B/2", "--image-size", "128").vae == "ema"
    assert resolve("--data", "x", "--model", "DiT-B/2", "--image-size", "64").vae is None  # small images: pixels
    assert resolve("--data", "x", "--model", "ADM-64", "--image-size", "256").vae is None  # ADMs are pixel models
    assert resolve().vae is None and resolve("--text-demo").vae is None  # the demos stay in pixel space
    assert resolve("--data", "d", "--captions", "c.json").vae == "ema"  # text-to-image on COCO 256
    with pytest.raises(dtr.InputError, match="--latents stores VAE latents: it needs --vae"):
        resolve("--data", "x", "--vae", "none", "--latents", "cache")


def test_train_grad_ckpt_reaches_the_model_and_keeps_its_state_dict():
    for model, size in (("DiT-T/2", 8), ("ADM-T", 16)):
        args = train.resolve_preset(train.parser().parse_args(["--model", model, "--image-size", str(size)]))
        args.num_classes = 6
        plain = train.init_state(args, CPU_RUN).model
        args.grad_ckpt = True
        ckpt = train.init_state(args, CPU_RUN).model
        assert not plain.use_checkpoint and ckpt.use_checkpoint
        assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ckpt.state_dict().items()}


# -- metrics.jsonl and FID during training (--eval-every)
def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_train_metrics_log_appends_whole_lines_and_keeps_one_timeline(tmp_path, monkeypatch):
    writes, real_write = [], os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    log = train.MetricsLog(str(tmp_path), 0)
    for step in (2, 4, 6):
        log.append(kind="train", step=step, loss=1.0 / step)
    log.append(kind="eval", step=4, metrics={"fid": 9.5})
    path = tmp_path / "metrics.jsonl"
    assert [json.loads(w) for w in writes] == read_jsonl(path)  # one os.write per record, of a whole line
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert train.scored_steps(str(tmp_path / "new"), {}, 6) == set() and train.scored_steps(str(tmp_path), {}, 6) == {4}
    assert train.scored_steps(str(tmp_path), {"num_samples": 8}, 3) == set()  # a resume at 3 drops step 4's score
    with pytest.raises(dtr.InputError, match="'num_samples': None"):  # scored with other settings: refused
        train.scored_steps(str(tmp_path), {"num_samples": 8}, 6)
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a torn last line: the machine stopped mid-append
    assert [r["step"] for r in dtr.read_metrics(str(path))] == [2, 4, 6, 4]
    train.MetricsLog(str(tmp_path), 4)  # resumed at step 4: what the interrupted run wrote after it goes
    assert read_jsonl(path) == [
        {"kind": "train", "step": 2, "loss": 0.5},
        {"kind": "train", "step": 4, "loss": 0.25},
        {"kind": "eval", "step": 4, "metrics": {"fid": 9.5}},
    ]


def test_train_meter_record_holds_hand_computed_means(tmp_path):
    args = argparse.Namespace(num_timesteps=1000, log_every=2, steps=4, global_batch_size=3, lr=1e-3)
    lines = []
    meter = train.Meter(args, CPU_RUN, lines.append, str(tmp_path), 0)
    uw = torch.tensor([0.0, math.log(2)])
    for step, t, losses, norm in ((1, [0, 10, 600], [1.0, 2.0, 4.0], 1.0), (2, [20, 700, 999], [3.0, 5.0, 6.0], 3.0)):
        meter.update(step, torch.tensor(t), torch.tensor(losses), torch.tensor(losses).mean(), uw, torch.tensor(norm))
    meter.close()
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["loss"] == pytest.approx(21 / 6) and record["step"] == 2 and record["lr"] == 1e-3
    # quarters of t * 4 // 1000: [0, 10, 20] -> 0, [600, 700] -> 2, 999 -> 3; none fell in quarter 1
    assert record["loss_quarters"] == [pytest.approx(2.0), None, pytest.approx(4.5), pytest.approx(6.0)]
    assert record["uw_weights"] == pytest.approx([0.5, 0.25]) and record["grad_norm"] == pytest.approx(2.0)
    assert record["images_per_s"] > 0 and record["peak_memory_bytes"] >= resident_memory()[0] // 2
    assert len(lines) == 1 and lines[0].startswith("step 0000002  loss 3.5000")


@pytest.mark.slow
def test_train_metrics_jsonl_survives_kill_and_resume_as_one_timeline(tmp_path):
    # the first run SIGKILLs itself before step 26: checkpoints at 10 and 20, records up to step 24
    killer = (
        "import os, signal, sys; import train; step = train.train_step\n"
        "def killing_step(args, run, net, diffusion, state, *rest):\n"
        "    if state.step == 25: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(args, run, net, diffusion, state, *rest)\n"
        "train.train_step = killing_step; train.main(train.parser().parse_args(sys.argv[1:]))\n"
    )
    flags = [*TINY_TRAIN, "--steps", "30", "--ckpt-every", "10", "--loss-weight", "ant-uw"]
    flags += ["--uw-clusters", "4", "--results-dir", str(tmp_path / "r")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    killed = subprocess.run([sys.executable, "-c", killer, *flags], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    exp = glob_ckpts(tmp_path)[0].split(os.sep + "checkpoints")[0]
    before = read_jsonl(os.path.join(exp, "metrics.jsonl"))
    assert [r["step"] for r in before] == list(range(2, 25, 2))  # 22 and 24 come after the last checkpoint (20)
    resumed = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), *flags, "--resume", "auto"], env=env, capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = read_jsonl(os.path.join(exp, "metrics.jsonl"))
    assert [r["step"] for r in after] == list(range(2, 31, 2))  # one timeline: every log step once, in order
    assert after[:10] == before[:10]  # the records up to the checkpoint are kept as they were
    # consistent: the losses and ANT-UW weights of one uninterrupted run (resuming is bit-exact)
    exp_one, _ = run_train(tmp_path, *flags[len(TINY_TRAIN) : -2], name="one")
    one = read_jsonl(os.path.join(exp_one, "metrics.jsonl"))
    for a, b in zip(after, one, strict=True):
        assert (a["step"], a["loss"], a["loss_quarters"]) == (b["step"], pytest.approx(b["loss"], rel=1e-6),
                                                              pytest.approx(b["loss_quarters"], rel=1e-6))  # fmt: skip
        assert a["uw_weights"] == pytest.approx(b["uw_weights"], rel=1e-6) and len(a["uw_weights"]) == 4
        assert a["kind"] == "train" and a["lr"] == 2e-3 and a["grad_norm"] > 0 and a["images_per_s"] > 0
        assert a["peak_memory_bytes"] > 2**20 and "ru_maxrss" in a["peak_memory"]


def small_dinov2(dino=fid.DINOv2):
    """The ViT-L layout at width 32 and depth 2: fd_dinov2 in seconds."""
    return dino(embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, weights_file):
    """(experiment, --eval flags) of a tiny demo run scored at steps 2 and 4 by is, pr, kid and fd_dinov2 (random
    Inception in pytorch-fid's layout, a small random DINOv2); FID's 2048-dim eigenproblem would take a minute here,
    and fd_dinov2 runs the same Frechet distance."""
    tmp = tmp_path_factory.mktemp("eval_run")
    dino_file = str(tmp / "dino.pth")
    torch.save(randomize(small_dinov2(), scale=0.2).state_dict(), dino_file)
    ref = _write_npz(tmp / "ref.npz", arr_0=_images(9, 8, 8, seed=3))
    flags = ["--eval", ref, "--metrics", "is,pr,kid,fd_dinov2", "--inception-weights", weights_file]
    flags += ["--dinov2-weights", dino_file]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid, "DINOv2", small_dinov2)
        exp, _ = run_train(tmp, *eval_train_flags(), *flags)
    return exp, flags


def eval_train_flags():
    return ["--steps", "4", "--ckpt-every", "2", "--eval-every", "2", "--eval-samples", "8"] + [
        "--eval-steps",
        str(SAMPLE_STEPS),
    ]


@pytest.mark.slow
def test_train_eval_scores_equal_sample_py_on_that_steps_checkpoint(eval_run, tmp_path, monkeypatch):
    exp, flags = eval_run
    records = read_jsonl(os.path.join(exp, "metrics.jsonl"))
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    scored = records[1]
    assert (scored["num_samples"], scored["sampler"], scored["sampling_steps"], scored["cfg_scale"]) == (
        8,
        "ddpm",
        SAMPLE_STEPS,
        1.5,  # the paper's guidance by default
    )
    logged = f"step 0000002  eval  inception_score {scored['metrics']['inception_score']:.4f}  inception_score_std"
    assert logged in open(os.path.join(exp, "log.txt")).read()  # in log.txt too
    monkeypatch.setattr(fid, "DINOv2", small_dinov2)
    ckpt = os.path.join(exp, "checkpoints", "0000002.pt")
    run_sample(ckpt, tmp_path / "s", "--batch-size", "8", "--cfg-scale", "1.5", "--seed", "0", *flags, n=8)
    expected = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert set(scored["metrics"]) == {"inception_score", "inception_score_std", "precision", "recall", "kid"} | {
        "kid_std",
        "fd_dinov2",
    }
    for k, v in scored["metrics"].items():  # the same images and features: equal up to float32 rounding
        assert v == pytest.approx(expected[k], rel=1e-5, abs=1e-8), k
    assert scored["metrics"] != records[3]["metrics"]  # the EMA moved between the two evaluations


@pytest.mark.slow
def test_train_eval_leaves_training_unchanged(eval_run, tmp_path):
    _, plain = run_train(tmp_path, "--steps", "4", "--ckpt-every", "2")  # the same run without --eval-every
    scored = torch.load(os.path.join(eval_run[0], "checkpoints", "0000004.pt"), weights_only=False)
    for key in ("model", "ema"):
        assert all(torch.equal(plain[key][k], scored[key][k]) for k in plain[key]), key
    assert all(torch.equal(a["cpu"], b["cpu"]) for a, b in zip(plain["rng"], scored["rng"]))  # the dropout stream


@pytest.mark.slow
def test_train_resumed_run_does_not_redo_a_recorded_eval(eval_run, tmp_path, monkeypatch):
    import shutil

    exp, flags = shutil.copytree(eval_run[0], tmp_path / "r" / "000-x"), eval_run[1]
    first = open(exp / "metrics.jsonl").read().splitlines()
    scored, evaluate = [], train.evaluate
    monkeypatch.setattr(
        train, "evaluate", lambda args, run, ev, ema, vae: scored.append(ema) or evaluate(args, run, ev, ema, vae)
    )
    monkeypatch.setattr(fid, "DINOv2", small_dinov2)
    os.remove(exp / "checkpoints" / "0000004.pt")  # interrupted after step 2's checkpoint: resuming continues it
    resume = ["--resume", str(exp / "checkpoints" / "0000002.pt")]
    run_train(tmp_path, *eval_train_flags(), *flags, *resume)
    assert len(scored) == 1  # step 4 only: step 2's score is in metrics.jsonl
    again = open(exp / "metrics.jsonl").read().splitlines()
    assert again[:2] == first[:2]  # kept as written, "seconds" included: not scored again
    assert [json.loads(line)["step"] for line in again] == [2, 2, 4, 4]
    assert json.loads(again[3])["metrics"] == json.loads(first[3])["metrics"]  # resumed bit-exactly: same scores


@pytest.mark.slow
def test_train_resume_refuses_other_eval_settings_than_the_recorded_scores(eval_run, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(fid, "DINOv2", small_dinov2)

    exp, flags = shutil.copytree(eval_run[0], tmp_path / "r" / "000-x"), eval_run[1]
    os.remove(exp / "checkpoints" / "0000004.pt")
    before = open(exp / "metrics.jsonl").read()
    resume = ["--resume", str(exp / "checkpoints" / "0000002.pt"), "--eval-samples", "6"]  # scored with 8
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path, *eval_train_flags(), *flags, *resume)
    err = str(stop.value)  # the one line main() exits with
    assert err.startswith("train.py: error: ") and "\n" not in err, err
    assert "'num_samples': 8" in err and "'num_samples': 6" in err, err
    assert open(exp / "metrics.jsonl").read() == before  # refused before the resumed timeline is cut


@pytest.mark.slow
def test_train_eval_on_two_ranks_equals_sample_py_on_one(eval_run, tmp_path):
    flags = eval_run[1]
    inception_only = flags[: flags.index("--metrics") + 1] + ["is,pr,kid"] + flags[flags.index("--inception-weights") :]
    r = torchrun(*TINY_TRAIN, *eval_train_flags(), *inception_only, "--results-dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-2000:]
    (exp,) = (tmp_path / "two").iterdir()
    scored = [r for r in read_jsonl(exp / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in scored] == [2, 4]
    # each rank sampled and scored half of the images one process samples from that step's checkpoint
    ckpt = exp / "checkpoints" / "0000002.pt"
    run_sample(ckpt, tmp_path / "s", "--batch-size", "4", "--cfg-scale", "1.5", *inception_only, n=8)
    expected = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert len(scored[0]["metrics"]) == 6
    for k, v in scored[0]["metrics"].items():
        assert v == pytest.approx(expected[k], rel=1e-5, abs=1e-8), k


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--eval-every", "2"], "--eval-every needs --eval REF"),
        (["--eval", "REF"], "--eval REF scores the model during training: it needs --eval-every STEPS"),
        (["--eval-every", "2", "--eval", "missing.npz"], "missing.npz: no such file or folder"),
        (["--eval-every", "2", "--eval", "REF", "--eval-samples", "3"], "--eval-samples must be at least 4"),
        (
            ["--eval-every", "2", "--eval", "REF", "--metrics", "fid", "--eval-samples", "1"],
            "at least 2 for --metrics fid",
        ),
        (["--eval-every", "2", "--eval", "REF", "--eval-steps", "0"], "--eval-steps 0 must be between 1 and"),
        (["--eval-every", "2", "--eval", "REF", "--metrics", "fid,nope"], "--metrics 'fid,nope': choose from"),
        (["--eval-every", "2", "--eval", "REF", "--unconditional", "--eval-cfg-scale", "2"], "no null class"),
        (["--eval-every", "2", "--eval", "REF", "--text-demo"], "for text-to-image, sample a checkpoint"),
        (["--eval-every", "2", "--eval", "REF"], "cannot download the FID Inception weights"),
        (["--eval-every", "2", "--eval", "SMALL", "--inception-weights", "W"], "need more than 3 images"),
    ],
)
def test_train_eval_flags_refused_at_start_up_with_one_line(tmp_path, monkeypatch, weights_file, flags, message):
    ref = _write_npz(tmp_path / "ref.npz", arr_0=_images(6, 8, 8))
    small = _write_npz(tmp_path / "small.npz", arr_0=_images(3, 8, 8))
    flags = [{"REF": ref, "SMALL": small, "W": weights_file}.get(f, f) for f in flags]

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(message)) as e:
        run_train(tmp_path, "--steps", "2", *flags)
    assert str(e.value).startswith("train.py: error:") and "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()  # stopped before the experiment folder


def test_train_eval_cfg_scale_default_is_the_papers_with_a_null_class():
    for flags, scale in ((["--eval-cfg-scale", "3"], 3.0), ([], 1.5), (["--class-dropout-prob", "0"], 1.0)):
        args = train.resolve_preset(train.parser().parse_args(["--eval-every", "2", "--eval", "x", *flags]))
        args.num_classes, args.context_dim = 6, None
        train.check_eval_flags(args, ("fid",))
        assert args.eval_cfg_scale == scale


# -- memory-mapped .npz / .npy data
def resident_memory():
    """(VmRSS, RssAnon) of this process in bytes. RssAnon is private memory (where a copy of arr_0 would live);
    VmRSS adds the page cache a memory map touches, which ranks share and this kernel maps in folios of up to 2 MB."""
    status = open("/proc/self/status").read()
    return tuple(int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) * 1024 for k in ("VmRSS", "RssAnon"))


def write_stored_npz(path, shape, labels):
    """An uncompressed .npz of uint8 images `shape` and int labels, streamed: never held in memory at once."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for start in range(0, shape[0], 10_000):
                f.write(np.full((min(10_000, shape[0] - start), *shape[1:]), start % 251, np.uint8).tobytes())
        buf = io.BytesIO()
        np.save(buf, labels)
        z.writestr("arr_1.npy", buf.getvalue())


def test_train_npz_is_memory_mapped_not_read(tmp_path, monkeypatch):
    shape = (400_000, 16, 16, 3)  # 307 MB of images
    write_stored_npz(tmp_path / "big.npz", shape, (np.arange(shape[0]) % 3).astype(np.int16))
    flags = [
        "--data",
        str(tmp_path / "big.npz"),
        "--model",
        "DiT-T/2",
        "--num-workers",
        "0",
        "--steps",
        "3",
        "--ckpt-every",
        "3",
        "--grid-steps",
        "1",
    ]
    seen, load_data, update = [], train.load_data, train.update_ema  # memory around loading, then at every step

    def loading(args):
        seen.append(resident_memory())
        out = load_data(args)
        seen.append(resident_memory())
        return out

    monkeypatch.setattr(train, "load_data", loading)
    monkeypatch.setattr(train, "update_ema", lambda *a: (seen.append(resident_memory()), update(*a)))
    _, ckpt = run_train(tmp_path, *flags, name="r")
    assert len(seen) == 5 and ckpt["args"]["num_classes"] == 3
    (before, loaded, *steps), size = np.array(seen), math.prod(shape)
    growth = loaded - before + steps[-1] - steps[0]  # (VmRSS, RssAnon) added by loading and by 2 more steps of data
    assert growth[1] < 0.05 * size and growth[0] < 0.25 * size, growth  # only the sampled images' pages
    before = resident_memory()[1]  # the measure can fail: reading arr_0 as np.load does costs all of it
    whole = np.load(tmp_path / "big.npz")["arr_0"]
    assert resident_memory()[1] - before > 0.9 * whole.nbytes


@pytest.mark.slow
def test_train_npz_memmap_values_compressed_refused_and_npy(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    b = np.asfortranarray(np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32))
    np.savez(tmp_path / "two.npz", a, b)
    for name, want in (("arr_0", a), ("arr_1", b)):  # against numpy's own reader, C and Fortran order
        got = dtr.memmap_npz(str(tmp_path / "two.npz"), name)
        assert isinstance(got, np.memmap) and got.dtype == want.dtype and np.array_equal(got, want)
    np.save(tmp_path / "images.npy", a)
    data, classes = train.load_data(
        argparse.Namespace(data=str(tmp_path / "images.npy"), image_size=8, unconditional=False)
    )
    assert classes == 1 and isinstance(data.images, np.memmap)
    assert torch.equal(data[3][0], torch.from_numpy(a[3]).permute(2, 0, 1))
    path = str(tmp_path / "small.npz")
    np.savez_compressed(path, a, np.arange(5) % 2)
    with pytest.raises(
        dtr.InputError, match="is compressed .* cannot be memory-mapped; store it uncompressed once"
    ) as e:
        train.load_data(argparse.Namespace(data=path, image_size=8, unconditional=False))
    assert "\n" not in str(e.value)
    hint = re.search(r'python -c "(.*)"$', str(e.value)).group(1)  # the hint's command works
    subprocess.run([sys.executable, "-c", hint], check=True, cwd=tmp_path)
    data, classes = train.load_data(
        argparse.Namespace(data=str(tmp_path / "small-stored.npz"), image_size=8, unconditional=False)
    )
    assert classes == 2 and isinstance(data.images, np.memmap) and np.array_equal(data.images, a)


# -- pre-encoded latents (--latents)
def write_noise_images(folder, n=24, classes=2, size=(40, 36)):
    """Random (so not mirror-symmetric) RGB images in `classes` class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        os.makedirs(os.path.join(folder, f"c{i % classes}"), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(folder, f"c{i % classes}", f"{i:03d}.png")
        )
    return str(folder)


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    """(image folder, tiny VAE dir, flags of a tiny latent run from that folder, a complete cache of it)."""
    root = tmp_path_factory.mktemp("latents")
    images, vae = write_noise_images(root / "images"), tiny_vae(root / "vae")
    flags = [
        "--data",
        images,
        "--model",
        "DiT-T/2",
        "--num-workers",
        "0",
        "--image-size",
        "32",
        "--vae",
        "ema",
        "--vae-path",
        vae,
        "--latent-shard-size",
        "5",
        "--steps",
        "3",
        "--ckpt-every",
        "3",
    ]
    args = train.resolve_preset(train.parser().parse_args([*flags, "--latents", str(root / "cache")]))
    train.prepare_latents(args, CPU_RUN, train.load_data(args)[0], dtr.load_vae("ema", vae))
    return images, vae, flags, str(root / "cache")


def cache_bytes(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_train_latent_cache_trains_like_on_the_fly_encoding(latent_setup, tmp_path, monkeypatch):
    images, vae_dir, flags, _ = latent_setup
    _, fly = run_train(tmp_path, *flags, name="fly")
    _, built = run_train(tmp_path, *flags, "--latents", str(tmp_path / "cache"), name="built")  # builds, then trains
    record = json.load(open(tmp_path / "cache" / "cache.json"))
    assert record["flips"] and record["shape"] == [2, 2, 4, 4, 4] and record["source"]["count"] == 24
    assert sorted(os.listdir(tmp_path / "cache")) == ["cache.json"] + [f"shard_{k:05d}.npy" for k in range(5)]
    from diffusers.models import AutoencoderKL

    def refuse(*a, **k):
        raise AssertionError("read an image or ran the encoder while training from the cache")

    monkeypatch.setattr(train.ImageData, "__getitem__", refuse)
    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    _, cached = run_train(tmp_path, *flags, "--latents", str(tmp_path / "cache"), name="cached")
    monkeypatch.undo()
    for k in fly["model"]:  # float32 moments, the same posterior draws and flips: bit-identical training
        assert torch.equal(fly["model"][k], built["model"][k]) and torch.equal(fly["model"][k], cached["model"][k]), k
    # the flipped entry is the encoding of the mirrored image (computed here, one image at a time)
    vae = dtr.load_vae("ema", vae_dir)
    image = train.load_data(train.resolve_preset(train.parser().parse_args(flags)))[0][7][0]
    shard = np.load(tmp_path / "cache" / "shard_00001.npy")  # image 7 is row 2 of shard 1
    for f, x in enumerate((image, image.flip(2))):
        post = vae.encode(x[None].float() / 127.5 - 1).latent_dist
        torch.testing.assert_close(torch.from_numpy(shard[2, f, 0]), post.mean[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(shard[2, f, 1]), post.std[0], rtol=0, atol=1e-5)
    assert not np.allclose(shard[2, 0, 0], shard[2, 1, 0])


def test_train_latent_cache_resumes_after_a_kill(latent_setup, tmp_path):
    _, vae_dir, flags, complete = latent_setup
    cache = str(tmp_path / "cache")
    args = train.resolve_preset(train.parser().parse_args([*flags, "--latents", cache]))
    dataset, vae = train.load_data(args)[0], dtr.load_vae("ema", vae_dir)
    encode, calls = vae.encode, []

    def dying(x):  # each of the 5 shards is one encoder call: die in the third
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(x)

    vae.encode = dying
    with pytest.raises(KeyboardInterrupt):
        train.prepare_latents(args, CPU_RUN, dataset, vae)
    assert sorted(os.listdir(cache)) == ["cache.partial.json", "shard_00000.npy", "shard_00001.npy"]
    open(os.path.join(cache, ".shard_00002.npy.tmp4242"), "wb").write(b"\x93NUMPY half")  # kill -9 mid-write
    finished = {k: os.stat(os.path.join(cache, f"shard_0000{k}.npy")) for k in (0, 1)}
    with pytest.raises(dtr.InputError, match="holds 32 px images, not --image-size 16"):  # the partial record counts
        small = train.resolve_preset(train.parser().parse_args([*flags, "--latents", cache, "--image-size", "16"]))
        train.prepare_latents(small, CPU_RUN, train.load_data(small)[0], vae)
    calls.clear()
    vae.encode = lambda x: (calls.append(len(x)), encode(x))[1]
    train.prepare_latents(args, CPU_RUN, dataset, vae)
    assert calls == [10, 10, 8]  # shards 2, 3, 4 (5, 5 and 4 images with their flips); 0 and 1 are not redone
    for k, st in finished.items():
        now = os.stat(os.path.join(cache, f"shard_0000{k}.npy"))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert cache_bytes(cache) == cache_bytes(complete)  # the same files as an uninterrupted build, temp file gone


@pytest.mark.parametrize(
    "case,message",
    [
        ("vae", "holds latents of another VAE (--vae ema --vae-path"),
        ("size", "holds 32 px images"),
        ("flips", "was built without flips but --flip-prob is 0.5: pass --flip-prob 0"),
        ("truncated", "shard_00003.npy is truncated or corrupt"),
        ("header", "shard_00001.npy is truncated or corrupt"),
        ("more", "holds 25 images but --latents"),
        ("renamed", "are not those --latents"),
        ("record", "cannot read"),
        ("norecord", "holds shards but no cache.json"),
        ("full", "no space left on the device while writing"),
    ],
)
def test_train_latent_cache_bad_input_one_line(latent_setup, tmp_path, monkeypatch, case, message):
    import shutil

    images, _, flags, complete = latent_setup
    cache, extra = str(tmp_path / "cache"), []
    shutil.copytree(complete, cache)
    if case in ("more", "renamed"):
        images = shutil.copytree(images, tmp_path / "images")
        flags = [str(images) if f == latent_setup[0] else f for f in flags]
        if case == "more":
            write_noise_images(tmp_path / "extra", n=1)
            shutil.copy(tmp_path / "extra" / "c0" / "000.png", images / "c1" / "999.png")
        else:
            os.rename(images / "c1" / "023.png", images / "c1" / "024.png")
    elif case == "vae":
        extra = ["--vae-path", tiny_vae(tmp_path / "other-vae", seed=1)]
    elif case == "size":
        extra = ["--image-size", "16"]
    elif case == "flips":
        shutil.rmtree(cache)
        args = train.resolve_preset(train.parser().parse_args([*flags, "--latents", cache, "--flip-prob", "0"]))
        vae = dtr.load_vae("ema", flags[flags.index("--vae-path") + 1])
        train.prepare_latents(args, CPU_RUN, train.load_data(args)[0], vae)
        assert len(np.load(os.path.join(cache, "shard_00000.npy"))[0]) == 1  # no flipped entries
    elif case == "truncated":
        with open(os.path.join(cache, "shard_00003.npy"), "r+b") as f:
            f.truncate(1000)
    elif case == "header":
        with open(os.path.join(cache, "shard_00001.npy"), "r+b") as f:
            f.write(b"garbage!")
    elif case == "record":
        open(os.path.join(cache, "cache.json"), "w").write("{")
    elif case == "norecord":
        os.remove(os.path.join(cache, "cache.json"))
    elif case == "full":
        shutil.rmtree(cache)
        save, saves = np.save, []

        def disk_full(f, array):  # the second shard finds the disk full halfway
            saves.append(1)
            if len(saves) == 2:
                f.write(b"\x93NUMPY partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            save(f, array)

        monkeypatch.setattr(np, "save", disk_full)
    before = cache_bytes(cache) if os.path.exists(cache) else None
    with pytest.raises(SystemExit, match=re.escape(message)) as e:
        run_train(tmp_path, *flags, *extra, "--latents", cache)
    assert "\n" not in str(e.value)
    if case == "full":  # the finished shard and the record stay, the partial file is gone; a re-run completes
        assert sorted(os.listdir(cache)) == ["cache.partial.json", "shard_00000.npy"]
        monkeypatch.undo()
        run_train(tmp_path, *flags, "--latents", cache, "--steps", "1", name="again")
        assert cache_bytes(cache) == cache_bytes(complete)
    else:
        assert cache_bytes(cache) == before  # nothing written is lost or changed


@pytest.mark.slow
def test_train_latent_cache_two_processes_share_the_encoding(latent_setup, tmp_path):
    _, _, flags, complete = latent_setup
    r = torchrun(
        *TINY_TRAIN,
        *flags,
        "--steps",
        "2",
        "--ckpt-every",
        "2",
        "--latents",
        str(tmp_path / "cache"),
        "--results-dir",
        str(tmp_path / "two"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "14/14" in r.stderr  # rank 0 encoded shards 0, 2 and 4 (5 + 5 + 4 images), rank 1 shards 1 and 3
    ours, theirs = cache_bytes(str(tmp_path / "cache")), cache_bytes(complete)
    assert ours.keys() == theirs.keys() and ours["cache.json"] == theirs["cache.json"]
    for name in ours:
        if name.endswith(".npy"):
            np.testing.assert_allclose(
                np.load(tmp_path / "cache" / name), np.load(os.path.join(complete, name)), atol=1e-6
            )
    _, one = run_train(tmp_path, *flags, "--steps", "2", "--ckpt-every", "2", "--latents", complete, name="one")
    two = torch.load(train.latest_checkpoint(str(tmp_path / "two")), weights_only=False)
    for k in one["model"]:
        assert torch.allclose(one["model"][k], two["model"][k], atol=1e-5), k


def test_train_latent_bench_runs(latent_setup, capsys):
    result = train.bench_latents(vae_path=latent_setup[1], model="DiT-T/2", image_size=32, batch_size=2, rounds=1)
    assert set(result) == {"on the fly", "cache"} and min(result.values()) > 0
    assert "interleaved rounds: on the fly" in capsys.readouterr().out


#################################################################################
#               train.py: text-to-image (a tiny CLIP, no download)              #
#################################################################################


def test_text_demo_data_and_flags():
    data, captions = train.load_text_data(
        argparse.Namespace(captions=None, demo_images_per_class=2, image_size=8, seed=0)
    )
    assert len(data) == len(captions) == 12 and data[5][1] == 5  # labels: image indices into the captions
    assert captions[0] == ("a red circle", "a picture of a red circle") and captions[11][0] == "a cyan diamond"
    u = torch.tensor([0.0, 0.99, 0.5], dtype=torch.float64)
    picked = train.pick_captions(captions, torch.tensor([0, 0, 11]), u)
    assert picked == ["a red circle", "a picture of a red circle", "a picture of a cyan diamond"]
    args = train.resolve_preset(train.parser().parse_args(["--text-demo"]))
    assert args.text_encoder == dtr.DEMO_TEXT_ENCODER and args.model == "DiT-T/2" and args.steps == 2400
    coco = train.resolve_preset(train.parser().parse_args(["--data", "d", "--captions", "c.json"]))
    assert coco.text_encoder == "openai/clip-vit-large-patch14" and coco.global_batch_size == 256
    for argv, message in (
        (["--text-demo", "--data", "d"], "leave out --data"),
        (["--cache-text", "c"], "apply to text"),
    ):
        with pytest.raises(dtr.InputError, match=message):
            train.resolve_preset(train.parser().parse_args(argv))


# The text path end to end, with no download: dtr.py's built-in tiny CLIP (a random CLIPTextModel from a config, with
# a character-level CLIPTokenizer), and a saved copy of another one loaded through --text-encoder DIR.
def fit_captions(model, args, steps=60):
    """fit_colours with the first 4 demo captions as the condition (10% dropped), so that samples follow the text."""
    context, _ = dtr.TextEncoder(dtr.DEMO_TEXT_ENCODER).encode([c[0] for c in train.SHAPE_CAPTIONS[:4]])
    model.train()
    return fit_colours(
        model, args, steps, lambda k, g: dict(y=context[k], force_drop_ids=torch.rand(32, generator=g) < 0.1)
    )


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A 2-step --text-demo run with --cache-text: (its checkpoint, experiment dir, cache dir), and (a checkpoint of
    its EMA model fitted to caption colours, that model, the run's args) for sampling."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("text")
    exp, ckpt = run_train(root, "--text-demo", "--cache-text", str(root / "cache"), "--steps", "2", "--ckpt-every", "2")
    args = argparse.Namespace(**ckpt["args"])
    model = dtr.build_model(dtr.model_args(args))
    model.load_state_dict(ckpt["ema"])
    fitted = fit_captions(model, args)
    path = save_train_ckpt(root / "fitted.pt", ckpt["args"], fitted.state_dict())
    return train.latest_checkpoint(str(root / "r")), exp, root / "cache", path, fitted, args


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Another tiny random CLIP text encoder, saved with save_pretrained: what --text-encoder DIR loads."""
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("clip") / "clip"
    tokenizer, model = dtr.tiny_clip(seed=1)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


def test_text_demo_training_cache_and_grid(text_run, tmp_path):
    ckpt_path, exp, cache = text_run[:3]
    ckpt = torch.load(ckpt_path, weights_only=False)
    enc = dtr.TextEncoder(dtr.DEMO_TEXT_ENCODER)
    assert (ckpt["args"]["context_dim"], ckpt["args"]["text_length"], ckpt["args"]["text_digest"]) == (
        64,
        32,
        enc.digest,
    )
    assert "y_embedder.embedding_table.weight" not in ckpt["ema"] and "null_context" in ckpt["ema"]
    prompts = [c[0] for c in train.SHAPE_CAPTIONS]
    assert open(os.path.join(exp, "samples_0000002.txt")).read().splitlines() == prompts
    grid = np.array(Image.open(os.path.join(exp, "samples_0000002.png")))
    assert grid.shape == (6 * 65 + 1, 8 * 65 + 1, 3)  # one row per prompt; 8-pixel samples upscaled 8x, padding 1
    files = sorted(cache.glob("*/*.pt"))
    assert 6 <= len(files) <= 12  # one per distinct caption: the 6 grid prompts and those drawn in training
    hidden, mask = enc.encode(prompts)
    enc.cache = str(cache)
    cached_hidden, cached_mask = enc(prompts)  # every prompt is read back from the cache
    assert torch.allclose(cached_hidden, hidden, atol=1e-6) and torch.equal(cached_mask, mask)
    assert mask.sum(1).tolist() == [len(p.replace(" ", "")) + 2 for p in prompts]  # start, characters, end
    _, again = run_train(tmp_path, "--text-demo", "--cache-text", str(cache), "--steps", "2", "--ckpt-every", "2")
    assert len(sorted(cache.glob("*/*.pt"))) == len(files)  # nothing encoded twice
    for k in ckpt["model"]:  # the cache holds what the encoder gave the first run: the same training, bit for bit
        assert torch.equal(ckpt["model"][k], again["model"][k]), k
    with pytest.raises(SystemExit, match="text_mask is False there but True now"):  # resuming checks the text setup
        run_train(tmp_path, "--text-demo", "--text-mask", "--steps", "3", "--resume", ckpt_path, name="re")


@pytest.mark.slow
def test_text_coco_training_is_the_same_on_two_processes(clip_dir, tmp_path):
    captions_per_image = [
        ["a dark square", "a black box", "night"],
        ["a grey tile"],
        ["pale", "light"],
        ["white"],
        ["a bright square", "snow"],
        ["x", "y", "z"],
        ["fog"],
        ["ash", "ember"],
    ]
    images, captions = write_coco(tmp_path, captions_per_image)
    args = [
        *TINY_TRAIN,
        "--data",
        images,
        "--captions",
        captions,
        "--text-encoder",
        clip_dir,
        "--text-mask",
        "--model",
        "DiT-T/2",
        "--num-workers",
        "0",
        "--steps",
        "2",
        "--ckpt-every",
        "2",
        "--log-every",
        "1",
        "--global-batch-size",
        "4",
    ]
    r = torchrun(*args, "--results-dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-2000:]
    one_exp, one = run_train(tmp_path, *args[len(TINY_TRAIN) :], name="one")
    two = torch.load(train.latest_checkpoint(str(tmp_path / "two")), weights_only=False)
    assert one["args"]["text_mask"] and one["args"]["text_encoder"] == clip_dir and one["args"]["num_classes"] == 1
    for k in one["model"]:  # the same captions for global sample i on any number of ranks
        assert torch.allclose(one["model"][k], two["model"][k], atol=1e-5), k
    assert "15 captions, text encoder" in open(os.path.join(one_exp, "log.txt")).read()
    (tmp_path / "prompts.txt").write_text("fog\na bright square\n")  # sampling with the key mask, through DIR
    out = run_sample(
        train.latest_checkpoint(str(tmp_path / "one")), tmp_path / "s", "--prompts", str(tmp_path / "prompts.txt"), n=2
    )
    model = dtr.build_model(dtr.model_args(one["args"]))
    model.load_state_dict(one["ema"])
    reference = text_reference(
        model.eval(),
        argparse.Namespace(**one["args"]),
        ["fog", "a bright square"],
        range(2),
        encoder=clip_dir,
        mask=True,
    )
    assert np.array_equal(out["arr_0"], reference)
    os.remove(os.path.join(images, "003.png"))
    with pytest.raises(SystemExit, match=r"1 of the 8 images of .*captions.json are not in .*images \(e.g. 003.png\)"):
        run_train(tmp_path, *args[len(TINY_TRAIN) :], name="bad")
    with pytest.raises(dtr.InputError, match="cannot load a CLIP text encoder from"):
        dtr.load_clip(str(tmp_path / "nowhere"))


#################################################################################
#                                   sample.py                                   #
#################################################################################


def fit_colours(model, args, steps=60, condition=lambda k, g: dict(y=k)):
    """A few Adam steps on 8x8 images coloured by class k (COLOURS), so that samples are images rather than saturated
    noise; condition(k, g) gives the model's keyword arguments for those classes."""
    diffusion = dtr.build_diffusion(dtr.model_args(args))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        k = torch.randint(0, 4, (32,), generator=g)
        x0 = COLOURS[k][:, :, None, None] + 0.3 * torch.randn(32, 1, 8, 1, generator=g) * torch.ones(1, 1, 1, 8)
        t = torch.randint(0, 1000, (32,), generator=g)
        kwargs = condition(k, g)  # its draws come before the noise's
        noise = torch.randn(x0.shape, generator=g)
        loss = diffusion.training_losses(model, x0, t, kwargs, noise=noise)["loss"]
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def fitted_dit(tmp_path_factory):
    """(checkpoint path, model) of the fitted_dit DiT; its raw weights are the untrained ones."""
    torch.manual_seed(0)
    model = dtr.build_model(dtr.model_args(ckpt_args()))
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    fit_colours(model, ckpt_args())
    path = tmp_path_factory.mktemp("ckpt") / "fitted.pt"
    return save_train_ckpt(path, ckpt_args(), model.state_dict(), raw), model


@torch.no_grad()
def reference_samples(
    model, labels, seeds, cfg_scale=1.0, sampler="ddpm", noise=None, schedule="linear", guided=None, vae=None
):
    """Samples straight from dtr's sampler over T = 1000 (not through train.generate or forward_with_cfg): per-sample
    generators, CFG written out here on the first `guided` eps channels (default: all), latents decoded by hand."""
    diffusion = dtr.create_diffusion(
        str(SAMPLE_STEPS), noise_schedule=schedule, learn_sigma=model.out_channels == 2 * model.in_channels
    )
    n, c, side = len(seeds), model.in_channels, model.input_size
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    net = model
    if cfg_scale != 1.0:  # one batch [cond | null class]; the unguided channels keep the conditional output
        g = c if guided is None else guided

        def net(x, t, y):
            null = torch.full_like(y, model.num_classes)
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
            return torch.cat([uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)

    y = None if labels is None else torch.as_tensor(labels)
    x = diffusion.p_sample_loop(
        net,
        (n, c, side, side),
        noise=noise,
        model_kwargs=dict(y=y),
        sampler=sampler,
        generators=None if noise is not None else gens,
        clip_denoised=vae is None,
    )
    if vae is not None:  # latents: Stable Diffusion's VAE scale
        x = vae.decode(x / 0.18215).sample
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class TinyDecoder(torch.nn.Module):
    """A stand-in for Stable Diffusion's VAE (no diffusers): decode = a fixed random 1x1 conv of asinh(latents) (random
    models' latents are large; asinh keeps most pixels off 0 and 255), upsampled 8x."""

    def __init__(self):
        super().__init__()
        self.conv = randomize(torch.nn.Conv2d(4, 3, 1), scale=0.05, seed=3)

    def decode(self, z):
        return argparse.Namespace(sample=F.interpolate(self.conv(torch.asinh(z)), scale_factor=8))


def fake_vae(monkeypatch):
    """Make sample.py's VAE a TinyDecoder -> (the decoder, the list of VAE kinds sample.py asked for)."""
    decoder, kinds = TinyDecoder(), []
    monkeypatch.setattr(dtr, "load_vae", lambda kind, path=None, device="cpu": kinds.append(kind) or decoder)
    return decoder, kinds


# -- Labels, seeds and shards
def test_sample_labels_and_shards():
    many, few = dtr.make_labels(1000, 5000, seed=3), dtr.make_labels(1000, 64, seed=3)
    assert many.dtype == np.int64 and 0 <= many.min() and many.max() < 1000 and len(np.unique(many)) > 900
    assert np.array_equal(many[:64], few)  # label i does not depend on N
    assert not np.array_equal(few, dtr.make_labels(1000, 64, seed=4))
    assert dtr.make_labels(10, 5, 0, [7, 2]).tolist() == [7, 2, 7, 2, 7]  # sample i gets class_labels[i % len]
    assert sample.shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)] and sample.shard_ranges(3, 4) == [(0, 3)]


# -- Output format and reproducibility
def test_sample_npz_format_and_same_images_for_any_batch_and_shard_size(fitted_dit, tmp_path):
    ckpt, model = fitted_dit
    a = run_sample(ckpt, tmp_path / "a", "--cfg-scale", "1.5", "--batch-size", "1", "--shard-size", "4")
    b = run_sample(ckpt, tmp_path / "b", "--cfg-scale", "1.5", "--batch-size", "4", "--shard-size", "5")
    assert sorted(os.listdir(tmp_path / "a")) == ["grid.png", "run.json", "samples_6x8x8x3.npz"]  # shards removed
    assert sorted(a) == ["arr_0", "arr_1"] and a["arr_0"].dtype == np.uint8 and a["arr_1"].dtype == np.int64
    assert a["arr_0"].shape == (6, 8, 8, 3) and a["arr_1"].shape == (6,)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert np.array_equal(a["arr_1"], dtr.make_labels(4, 6, seed=0))
    assert np.array_equal(a["arr_0"], reference_samples(model, a["arr_1"], range(6), cfg_scale=1.5))
    inner = ((a["arr_0"] > 0) & (a["arr_0"] < 255)).mean()
    assert inner > 0.2 and len({im.tobytes() for im in a["arr_0"]}) == 6  # real, distinct images
    from PIL import Image

    assert Image.open(tmp_path / "a" / "grid.png").size == (6 * 10 + 2, 12)  # 8-wide grid, 2-pixel padding


@pytest.mark.slow
def test_sample_torchrun_two_ranks_give_the_same_npz(fitted_dit, tmp_path):
    ckpt, _ = fitted_dit
    one = run_sample(ckpt, tmp_path / "one", "--cfg-scale", "1.5", "--batch-size", "6", "--save-png")
    flags = ["--num-samples", "6", "--batch-size", "1", "--shard-size", "2", "--num-sampling-steps", str(SAMPLE_STEPS)]
    proc = torchrun(
        "--ckpt", ckpt, "--out", str(tmp_path / "two"), *flags, "--cfg-scale", "1.5", "--save-png", script="sample.py"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 sampled now on 2 rank(s)" in proc.stdout
    with np.load(tmp_path / "two" / "samples_6x8x8x3.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    from PIL import Image

    pngs = sorted(os.listdir(tmp_path / "two" / "images"))
    assert pngs == [f"{i:06d}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "images" / "000005.png")), one["arr_0"][5])


def test_sample_cfg_scale_one_is_the_unguided_path(fitted_dit, tmp_path, monkeypatch):
    ckpt, model = fitted_dit
    batches = []
    forward = dtr.DiT.forward

    def counted(self, x, *a, **kw):  # records every batch the network sees
        batches.append(len(x))
        return forward(self, x, *a, **kw)

    monkeypatch.setattr(dtr.DiT, "forward", counted)
    plain = run_sample(ckpt, tmp_path / "plain", "--class-labels", "3", "1", "--batch-size", "3")
    assert set(batches) == {3}  # no doubled batch at scale 1
    batches.clear()
    guided = run_sample(ckpt, tmp_path / "guided", "--class-labels", "3", "1", "--batch-size", "3", "--cfg-scale", "4")
    assert set(batches) == {6}  # [cond | null]
    assert plain["arr_1"].tolist() == guided["arr_1"].tolist() == [3, 1, 3, 1, 3, 1]
    assert np.array_equal(plain["arr_0"], reference_samples(model, plain["arr_1"], range(6)))
    assert np.array_equal(guided["arr_0"], reference_samples(model, guided["arr_1"], range(6), cfg_scale=4))
    assert (plain["arr_0"] != guided["arr_0"]).mean() > 0.1


def test_sample_ddim_eta0_depends_only_on_the_initial_noise(fitted_dit, tmp_path):
    ckpt, model = fitted_dit
    out = run_sample(ckpt, tmp_path / "ddim", "--sampler", "ddim", "--eta", "0", "--seed", "5", "--class-labels", "2")
    noise = dtr.randn((6, 3, 8, 8), [torch.Generator().manual_seed(5 + i) for i in range(6)])  # x_T of seeds 5..10
    assert np.array_equal(out["arr_0"], reference_samples(model, [2] * 6, range(6), sampler="ddim", noise=noise))
    ddpm = run_sample(ckpt, tmp_path / "ddpm", "--seed", "5", "--class-labels", "2")
    assert (ddpm["arr_0"] != out["arr_0"]).any()


@pytest.mark.slow
def test_sample_eval_equals_sample_then_fid(fitted_dit, weights_file, tmp_path, monkeypatch, capsys):
    # every metric, fd_dinov2 on a small DINOv2 (the ViT-L layout at width 32, depth 2) with random weights
    ckpt, _ = fitted_dit
    dino = fid.DINOv2
    monkeypatch.setattr(fid, "DINOv2", lambda: dino(embed_dim=32, depth=2, num_heads=4))
    dino_file = str(tmp_path / "dino.pth")
    torch.save(randomize(dino(embed_dim=32, depth=2, num_heads=4), scale=0.2).state_dict(), dino_file)
    ref = _write_npz(tmp_path / "ref.npz", arr_0=_images(9, 8, 8, seed=3))
    metrics = "fid,sfid,is,pr,kid,fd_dinov2"
    weights = ["--inception-weights", weights_file, "--dinov2-weights", dino_file]
    flags = ["--batch-size", "4", "--cfg-scale", "1.5", "--eval", ref, "--metrics", metrics, *weights]
    samples = run_sample(ckpt, tmp_path / "eval", *flags, n=8)
    with open(tmp_path / "eval" / "metrics.json") as f:
        during = json.load(f)
    assert "FD-DINOv2: " in capsys.readouterr().out
    # sample, then fid.py on the written images (same batches of 4)
    smp = str(tmp_path / "eval" / "samples_8x8x8x3.npz")
    assert np.array_equal(np.load(smp)["arr_0"], samples["arr_0"])
    kw = dict(metrics=metrics, inception_weights=weights_file, dinov2_weights=dino_file, batch_size=4)
    fid.main(_cli_args(ref, smp, json=str(tmp_path / "after.json"), **kw))
    after = json.loads((tmp_path / "after.json").read_text())
    assert {k: during[k] for k in fid.RESULT_NAMES} == {k: after[k] for k in fid.RESULT_NAMES}
    fid.main(_cli_args(smp, str(tmp_path / "smp_stats.npz"), save_stats=True, **kw))
    with np.load(tmp_path / "eval" / "sample_stats.npz") as a, np.load(tmp_path / "smp_stats.npz") as b:
        assert sorted(a.files) == sorted(b.files) and "dinov2" in a.files
        for k in a.files:
            assert np.array_equal(a[k], b[k]), k  # bit-identical features and statistics
    # two ranks, a shard each: every rank extracts its own samples' features and a share of REF's
    flags_ddp = [*flags[: flags.index("--metrics") + 1], "fid,sfid,is,pr,kid", *weights]
    proc = torchrun("--ckpt", ckpt, "--out", str(tmp_path / "ddp"), "--num-samples", "8", "--shard-size", "4",
                    "--num-sampling-steps", str(SAMPLE_STEPS), *flags_ddp, script="sample.py")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["metrics"] == ["fid", "sfid", "is", "pr", "kid"]
    for k in ("fid", "sfid", "inception_score", "precision", "recall", "kid"):
        assert ddp[k] == pytest.approx(during[k], rel=1e-5, abs=1e-8), k
    # no images kept: the same numbers, no samples file
    argv = ["--ckpt", str(ckpt), "--out", str(tmp_path / "bare"), "--num-samples", "8"]
    argv += ["--num-sampling-steps", str(SAMPLE_STEPS), *flags, "--no-images"]
    sample.main(sample.parser().parse_args(argv))
    assert sorted(os.listdir(tmp_path / "bare")) == ["metrics.json", "run.json", "sample_stats.npz"]
    capsys.readouterr()
    sample.main(sample.parser().parse_args([*argv, "--resume"]))  # metrics.json is written last: the run is done
    assert "metrics.json is already complete" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"other settings \(no_images\)"):  # a run's flags cannot be dropped
        sample.main(sample.parser().parse_args([*argv[: argv.index("--no-images")], "--resume"]))
    bare = json.loads((tmp_path / "bare" / "metrics.json").read_text())
    assert {k: bare[k] for k in fid.RESULT_NAMES} == {k: during[k] for k in fid.RESULT_NAMES}
    # bad input: one line, nothing written
    with pytest.raises(SystemExit, match="needs --eval"):
        run_sample(ckpt, tmp_path / "bad", "--no-images")
    with pytest.raises(SystemExit, match="--metrics 'fid,nope'"):
        run_sample(ckpt, tmp_path / "bad", "--eval", ref, "--metrics", "fid,nope")
    fid.main(_cli_args(ref, str(tmp_path / "ref_stats.npz"), save_stats=True, inception_weights=weights_file))
    with pytest.raises(SystemExit, match="ref_stats.npz has no dinov2 features and no images"):
        run_sample(ckpt, tmp_path / "bad", "--eval", str(tmp_path / "ref_stats.npz"), "--metrics", "fd_dinov2")
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow  # Inception features of 36 images on the CPU
def test_sample_eval_resume_scores_what_is_newly_asked_against_this_ref(fitted_dit, weights_file, tmp_path, capsys):
    ckpt, _ = fitted_dit
    ref_a, ref_b = (_write_npz(tmp_path / f"{n}.npz", arr_0=_images(6, 8, 8, seed=s)) for n, s in (("a", 3), ("b", 4)))
    out = tmp_path / "out"
    argv = ["--ckpt", ckpt, "--out", str(out), "--num-samples", "6", "--num-sampling-steps", str(SAMPLE_STEPS),
            "--batch-size", "3", "--inception-weights", weights_file]  # fmt: skip

    def run(ref, metrics, *more):
        sample.main(sample.parser().parse_args([*argv, "--eval", ref, "--metrics", metrics, *more]))
        return json.loads((out / "metrics.json").read_text())

    def sha256(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    first = run(ref_a, "fid")
    second = run(ref_b, "fid,kid", "--resume")  # another REF and a new metric, from the saved sample features
    smp = str(out / "samples_6x8x8x3.npz")
    fid.main(_cli_args(ref_b, smp, metrics="fid,kid", inception_weights=weights_file, json=str(tmp_path / "b.json")))
    expected = json.loads((tmp_path / "b.json").read_text())  # fid.py on the kept images, in the same batches of 3
    assert (second["reference"], second["reference_digest"], second["metrics"]) == (
        ref_b,
        sha256(ref_b),
        ["fid", "kid"],
    )
    assert {k: second[k] for k in ("fid", "kid", "kid_std")} == {k: expected[k] for k in ("fid", "kid", "kid_std")}
    assert first["reference"] == ref_a and first["fid"] != second["fid"]
    capsys.readouterr()
    assert run(ref_b, "kid", "--resume") == second  # asked and scored against this REF: nothing to do
    assert "metrics.json is already complete" in capsys.readouterr().out
    _write_npz(ref_b, arr_0=_images(6, 8, 8, seed=5))  # other images under the same name: scored anew
    third = run(ref_b, "fid", "--resume")
    assert third["reference_digest"] == sha256(ref_b) != second["reference_digest"] and third["metrics"] == ["fid"]
    assert third["fid"] != second["fid"]
    with pytest.raises(SystemExit, match="holds no dinov2 features of the samples, which --metrics fd_dinov2 needs"):
        run(ref_b, "fid,fd_dinov2", "--resume")  # refused in one line: nothing written
    assert json.loads((out / "metrics.json").read_text()) == third


def test_sample_compile_runs_the_network_compiled_with_the_same_images(fitted_dit, tmp_path, monkeypatch):
    # inductor needs minutes on a small CPU, so the graphs dynamo captures run eagerly here (same ops, same images)
    ckpt, _ = fitted_dit
    backends, graphs, compile_ = [], [], torch.compile

    def recording(fn, backend="inductor", **kw):
        backends.append(backend)
        return compile_(fn, backend=lambda gm, inputs: graphs.append(gm) or gm.forward, **kw)

    monkeypatch.setattr(torch, "compile", recording)
    torch._dynamo.reset()
    try:
        plain = run_sample(ckpt, tmp_path / "plain", "--cfg-scale", "1.5", "--batch-size", "4")
        assert backends == [] and graphs == []
        compiled = run_sample(ckpt, tmp_path / "compiled", "--cfg-scale", "1.5", "--batch-size", "4", "--compile")
        assert backends == ["inductor"] and graphs  # the flag reached torch.compile, and dynamo captured the network
        assert np.array_equal(plain["arr_0"], compiled["arr_0"])
        monkeypatch.undo()  # the real torch.compile refuses a backend it does not know, before anything is written
        with pytest.raises(SystemExit, match="--compile nope"):
            run_sample(ckpt, tmp_path / "bad", "--compile", "nope")
        assert not os.path.exists(tmp_path / "bad")
    finally:
        torch._dynamo.reset()


def test_sample_weights_flag_picks_raw_weights(fitted_dit, tmp_path):
    ckpt, model = fitted_dit
    raw = torch.load(ckpt, weights_only=False)["model"]
    swapped = save_train_ckpt(tmp_path / "swapped.pt", ckpt_args(), ema=raw, raw=model.state_dict())
    ema = run_sample(ckpt, tmp_path / "ema")
    assert np.array_equal(run_sample(swapped, tmp_path / "model", "--weights", "model")["arr_0"], ema["arr_0"])
    assert not np.array_equal(run_sample(swapped, tmp_path / "swapped-ema")["arr_0"], ema["arr_0"])


def test_sample_checkpoints_written_before_model_args_still_load(fitted_dit, tmp_path):
    ckpt, model = fitted_dit
    # the old layout: no "model_args", the model arguments only among all of train.py's flags (an unconditional run
    # recorded the --class-dropout-prob flag it did not use)
    old_args = dict(ckpt_args(), loss_weight="constant", lr=1e-4, seed=0, vae_path=None)
    old = tmp_path / "old.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "opt": {},
            "args": old_args,
            "step": 0,
            "uw": None,
            "rng": None,
            "data": None,
        },
        old,
    )
    assert np.array_equal(run_sample(old, tmp_path / "old")["arr_0"], run_sample(ckpt, tmp_path / "new")["arr_0"])
    uncond = dict(old_args, num_classes=1, class_dropout_prob=0.1)
    assert dtr.checkpoint_model_args({"args": uncond})["class_dropout_prob"] == 0.0
    assert dtr.checkpoint_model_args({"args": {"lr": 1e-4}}) is None  # not a train.py checkpoint


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sample_autocast_precision_is_close_to_fp32(fitted_dit, tmp_path, precision):
    ckpt, _ = fitted_dit
    full = run_sample(ckpt, tmp_path / "fp32", "--class-labels", "0", "1", "2", "3")
    half = run_sample(ckpt, tmp_path / precision, "--class-labels", "0", "1", "2", "3", "--precision", precision)
    diff = np.abs(full["arr_0"].astype(int) - half["arr_0"].astype(int))
    assert diff.mean() < 20 and np.array_equal(full["arr_1"], half["arr_1"])


# -- Output folder: no overwriting, resume
def test_sample_resume_skips_finished_shards(fitted_dit, tmp_path, monkeypatch):
    ckpt, _ = fitted_dit
    full = run_sample(ckpt, tmp_path / "full")
    out, calls, generate = tmp_path / "out", [], dtr.generate

    def interrupted(*a, **kw):  # dies in the second batch, after the first shard was written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*a, **kw)

    monkeypatch.setattr(dtr, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sample(ckpt, out, "--shard-size", "2", "--batch-size", "2")
    monkeypatch.setattr(dtr, "generate", generate)
    shard = out / ".shards" / "shard-000000.npz"
    assert sorted(os.listdir(out / ".shards")) == ["shard-000000.npz"]
    with np.load(shard) as z:  # mark the finished shard, to see it reused rather than redone
        marked = {**{k: z[k] for k in z.files}, "arr_0": np.full_like(z["arr_0"], 7)}
    np.savez(shard, **marked)
    with pytest.raises(SystemExit, match="already holds samples; pass --resume"):
        run_sample(ckpt, out, "--shard-size", "2", "--batch-size", "2")
    with pytest.raises(SystemExit, match=r"other settings \(cfg_scale\)"):
        run_sample(ckpt, out, "--shard-size", "2", "--resume", "--cfg-scale", "2")
    resumed = run_sample(ckpt, out, "--shard-size", "2", "--batch-size", "1", "--resume")  # another batch size is fine
    assert (resumed["arr_0"][:2] == 7).all() and np.array_equal(resumed["arr_0"][2:], full["arr_0"][2:])
    assert np.array_equal(resumed["arr_1"], full["arr_1"]) and not os.path.exists(out / ".shards")
    before = os.stat(out / "samples_6x8x8x3.npz").st_mtime_ns
    run_sample(ckpt, out, "--shard-size", "2", "--resume")  # complete: nothing to do
    assert os.stat(out / "samples_6x8x8x3.npz").st_mtime_ns == before
    redone = run_sample(ckpt, out, "--shard-size", "2", "--overwrite")
    assert np.array_equal(redone["arr_0"], full["arr_0"])


def test_sample_missing_shard_is_one_line_and_resume_fills_it(fitted_dit, tmp_path, monkeypatch):
    ckpt, _ = fitted_dit
    full = run_sample(ckpt, tmp_path / "full")
    out, sample_shards = tmp_path / "out", sample.sample_shards

    def elsewhere(model, diffusion, shards, **kw):  # shard 1 went to another machine's disk
        return sample_shards(model, diffusion, [k for k in shards if k != 1], **kw)

    monkeypatch.setattr(sample, "sample_shards", elsewhere)
    with pytest.raises(SystemExit) as e:
        run_sample(ckpt, out, "--shard-size", "2")
    shard = out / ".shards" / "shard-000001.npz"
    assert str(e.value.code) == (
        f"sample.py: error: shard {shard} is missing: put --out on a filesystem every rank "
        "shares, or rerun with --resume to sample the missing shards here"
    )
    assert sorted(os.listdir(out / ".shards")) == ["shard-000000.npz", "shard-000002.npz"]  # nothing lost
    assert not os.path.exists(out / "samples_6x8x8x3.npz")
    monkeypatch.setattr(sample, "sample_shards", sample_shards)
    resumed = run_sample(ckpt, out, "--shard-size", "2", "--resume")
    assert np.array_equal(resumed["arr_0"], full["arr_0"]) and np.array_equal(resumed["arr_1"], full["arr_1"])


# -- Other checkpoints: unconditional ADM, bare DiT state dicts, latent models
def test_sample_unconditional_adm_ignores_labels(tmp_path, capsys):
    args = ckpt_args(model="ADM-T", image_size=16, num_classes=1, class_dropout_prob=0.0, noise_schedule="cosine")
    torch.manual_seed(0)
    model = randomize(
        dtr.build_model(dtr.model_args(args)), scale=0.05, seed=0, add=True
    ).eval()  # zero-init layers contribute
    ckpt = save_train_ckpt(tmp_path / "adm.pt", args, model.state_dict())
    out = run_sample(ckpt, tmp_path / "out", "--class-labels", "3", n=3)
    assert sorted(out) == ["arr_0"] and out["arr_0"].shape == (3, 16, 16, 3) and out["arr_0"].dtype == np.uint8
    assert "sample.py: warning: the model is unconditional; --class-labels ignored" in capsys.readouterr().err
    assert np.array_equal(out["arr_0"], reference_samples(model, None, range(3), schedule="cosine"))


def test_sample_bare_dit_state_dicts(fitted_dit, tmp_path):
    ckpt, model = fitted_dit
    dtr_run = run_sample(ckpt, tmp_path / "dtr")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as saved from a DDP model
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    with pytest.raises(SystemExit, match="name its --model and --image-size"):
        run_sample(bare, tmp_path / "x")
    none_ckpt = save_train_ckpt(tmp_path / "none.pt", ckpt_args(routing="none"), model.state_dict())
    no_routing = run_sample(bare, tmp_path / "bare", "--model", "DiT-T/2", "--image-size", "8")  # DiT's: no routing
    assert np.array_equal(no_routing["arr_0"], run_sample(none_ckpt, tmp_path / "none")["arr_0"])
    assert not np.array_equal(no_routing["arr_0"], dtr_run["arr_0"])
    masks = dtr.dtr_masks(1000, 128)  # the official DTR code keeps each block's masks in its state dict
    torch.save({**state, **{f"blocks.{i}.routing._unit_mapping": masks for i in range(4)}}, bare)
    cosine = save_train_ckpt(tmp_path / "cosine.pt", ckpt_args(noise_schedule="cosine"), model.state_dict())
    official = run_sample(bare, tmp_path / "official", "--model", "DiT-T/2", "--image-size", "8")["arr_0"]
    assert np.array_equal(official, run_sample(cosine, tmp_path / "cosine")["arr_0"])  # no config: the official default
    assert not np.array_equal(official, dtr_run["arr_0"])
    masks[999, 0] = 1  # a row with one channel more than the others (its window is at the right end)
    torch.save({**state, **{f"blocks.{i}.routing._unit_mapping": masks for i in range(4)}}, bare)
    with pytest.raises(SystemExit, match="routing masks do not keep one number of channels per task"):
        run_sample(bare, tmp_path / "wrong", "--model", "DiT-T/2", "--image-size", "8")


def test_sample_latent_checkpoint_decodes_through_the_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,) * 4,
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.save_pretrained(tmp_path / "vae")  # a local, tiny stand-in for sd-vae-ft-ema (8x downsampling, 4 channels)
    args = ckpt_args(image_size=32, vae="ema")
    torch.manual_seed(0)
    model = randomize(dtr.build_model(dtr.model_args(args))).eval()  # zero-init layers contribute
    ckpt = save_train_ckpt(tmp_path / "latent.pt", args, model.state_dict())
    out = run_sample(ckpt, tmp_path / "out", "--vae-path", str(tmp_path / "vae"), "--class-labels", "1", n=2)
    assert out["arr_0"].shape == (2, 32, 32, 3) and out["arr_1"].tolist() == [1, 1]
    # decoded by hand (reference_samples: vae.decode(x / 0.18215)) with the VAE built above, not the one read back
    assert np.array_equal(out["arr_0"], reference_samples(model, [1, 1], range(2), vae=vae.eval()))


def test_sample_explicit_vae_flag_wins_over_the_training_vae_path(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    trained, hub_mse = tiny_vae(tmp_path / "trained", seed=0), tiny_vae(tmp_path / "hub-mse", seed=1)
    real = diffusers.AutoencoderKL.from_pretrained  # the hub's sd-vae-ft-mse is the second tiny VAE here (offline)
    hub = {"stabilityai/sd-vae-ft-mse": hub_mse}
    monkeypatch.setattr(
        diffusers.AutoencoderKL, "from_pretrained", lambda source, **kw: real(hub.get(source, source), **kw)
    )
    args = ckpt_args(image_size=32, vae="ema")
    torch.manual_seed(0)
    model = randomize(dtr.build_model(dtr.model_args(args))).eval()
    ckpt = save_train_ckpt(tmp_path / "latent.pt", dict(args, vae_path=trained), model.state_dict())
    own = run_sample(ckpt, tmp_path / "own", "--class-labels", "1", n=2)["arr_0"]
    mse = run_sample(ckpt, tmp_path / "mse", "--class-labels", "1", "--vae", "mse", n=2)["arr_0"]
    # the same latents decoded by hand with each VAE, read from its own folder
    decoded = {path: reference_samples(model, [1, 1], range(2), vae=real(path).eval()) for path in (trained, hub_mse)}
    assert (decoded[trained] != decoded[hub_mse]).mean() > 0.1  # the two decoders tell their images apart
    assert np.array_equal(own, decoded[trained]) and np.array_equal(mse, decoded[hub_mse])
    for out, vae, path in (("own", "ema", trained), ("mse", "mse", None)):  # the decoder used: with --vae, the kind's
        settings = json.loads((tmp_path / out / "run.json").read_text())["model_args"]  # own, not training's path
        assert (settings["vae"], settings["vae_path"]) == (vae, path)


def test_sample_guided_channels_leave_the_rest_unguided(tmp_path, monkeypatch):
    args = ckpt_args(image_size=64, vae="ema")  # 4 latent channels, 8x8
    torch.manual_seed(0)
    model = randomize(dtr.build_model(dtr.model_args(args))).eval()
    ckpt = save_train_ckpt(tmp_path / "latent.pt", args, model.state_dict())
    decoder, _ = fake_vae(monkeypatch)
    labels = ["--class-labels", "1", "2", "--cfg-scale", "4"]
    three = run_sample(ckpt, tmp_path / "three", *labels, "--guided-channels", "3", n=4)
    every = run_sample(ckpt, tmp_path / "all", *labels, n=4)
    # the reference guides eps channels 0-2 and keeps channel 3 (and sigma) from the conditional half
    assert np.array_equal(three["arr_0"], reference_samples(model, [1, 2] * 2, range(4), 4, guided=3, vae=decoder))
    assert np.array_equal(every["arr_0"], reference_samples(model, [1, 2] * 2, range(4), 4, vae=decoder))
    assert (three["arr_0"] != every["arr_0"]).mean() > 0.05
    with open(tmp_path / "three" / "run.json") as f:
        assert json.load(f)["guided_channels"] == 3
    with pytest.raises(SystemExit, match=r"--guided-channels must be in 1..4 \(the model's noise channels\), got 5"):
        run_sample(ckpt, tmp_path / "five", *labels, "--guided-channels", "5")


# -- official DTR checkpoints (byeongjun-park/DTR): {"model", "ema", "opt", "config"[, "uw"]}, masks in the weights
def official_config(**routing):
    """The official DTR code's hydra config as its train.py saves it (base_config.yaml + data/ImageNet.yaml +
    models/DiT.yaml, with the fields it fills in), for a 4-class DiT-T/2 on 64x64 images, cosine, beta 0.6, VAE mse."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "general": {
                "data_path": "/data/imagenet/train",
                "iterations": 400000,
                "num_workers": 16,
                "global_batch_size": 256,
                "global_seed": 0,
                "gpu_offset": 0,
                "mixed_precision": True,
                "image_size": 64,
                "schedule_name": "cosine",
                "loss_weight_type": "constant",
                "vae": "mse",
            },
            "optim": {"lr": 1e-4, "weight_decay": 0.0},
            "data": {"name": "ImageNet", "num_classes": 4, "is_uncond": False},
            "models": {
                "name": "DiT-T/2",
                "param": {"num_classes": "${data.num_classes}", "latent_size": 8},
                "routing": {"sharing_ratio": 0.6, "taskcount": 1000, "init_method": "DTR", **routing},
            },
            "logs": {
                "log_every": 100,
                "ckpt_every": 50000,
                "project_name": "${data.name}",
                "results_dir": "results/${data.name}/${general.schedule_name}_scheduling/${models.routing.init_method}"
                "_${models.routing.sharing_ratio}_${general.loss_weight_type}",
            },
            "eval": {"per_proc_batch_size": 200, "num_fid_samples": 50000, "cfg_scale": 1.5, "num_sampling_steps": 250},
        }
    )


def official_dit(routing="dtr", **kw):
    """Our DiT with the settings of official_config, random weights (no zero-initialised layer left), eval mode."""
    torch.manual_seed(0)
    model = dtr.DiT_models["DiT-T/2"](input_size=8, in_channels=4, num_classes=4, routing=routing, beta=0.6, **kw)
    return randomize(model).eval()


def save_official_ckpt(path, state, masks, config):
    """A checkpoint as the official code's save_checkpoint writes it: its DiT's state dict holds a float mask table
    blocks.{i}.routing._unit_mapping (T, C) per block; the weights are named as facebookresearch/DiT's (and ours)."""
    weights = {**state, **{f"blocks.{i}.routing._unit_mapping": m.float() for i, m in enumerate(masks)}}
    torch.save({"model": weights, "ema": weights, "opt": {}, "config": config}, path)
    return path


def test_sample_official_dtr_checkpoint_reads_its_config(tmp_path, monkeypatch):
    pytest.importorskip("omegaconf")
    model = official_dit()
    masks = [reference_dtr(1000, 128, 4.0, 0.6)] * 4  # the official code: alpha 4, one table per block
    ckpt = save_official_ckpt(tmp_path / "0050000.pt", model.state_dict(), masks, official_config())
    args, _ = sample.load_checkpoint(str(ckpt))  # no --model / --image-size needed
    args = argparse.Namespace(**args)
    assert (args.model, args.image_size, args.vae, args.num_classes, args.class_dropout_prob, args.learn_sigma) == (
        "DiT-T/2",
        64,
        "mse",
        4,
        0.1,
        True,
    )
    assert (args.routing, args.alpha, args.beta, args.num_timesteps, args.noise_schedule) == (
        "dtr",
        4.0,
        0.6,
        1000,
        "cosine",
    )
    kept = np.arange(SAMPLE_STEPS) * 111  # 10 of 1000 steps, evenly: 0, 111, ..., 999
    abar = np.cumprod(1 - dtr.get_named_beta_schedule("cosine", 1000))[kept]
    betas = dtr.build_diffusion(dtr.model_args(args), str(SAMPLE_STEPS)).betas.numpy()  # what sample.py samples with
    assert np.array_equal(betas, 1 - abar / np.append(1, abar[:-1]))
    decoder, kinds = fake_vae(monkeypatch)
    out = run_sample(ckpt, tmp_path / "out", "--cfg-scale", "1.5", n=4)
    assert kinds == ["mse"] and out["arr_0"].shape == (4, 64, 64, 3)
    with open(tmp_path / "out" / "run.json") as f:
        assert json.load(f)["model_args"]["noise_schedule"] == "cosine"
    reference = reference_samples(model, out["arr_1"], range(4), 1.5, schedule="cosine", vae=decoder)
    assert np.array_equal(out["arr_0"], reference)
    assert not np.array_equal(reference, reference_samples(model, out["arr_1"], range(4), 1.5, vae=decoder))  # linear
    with pytest.raises(dtr.InputError, match="--image-size 256 contradicts the checkpoint's 64"):
        sample.load_checkpoint(str(ckpt), image_size=256)
    save_official_ckpt(ckpt, model.state_dict(), [masks[0].flip(1)] * 4, official_config())
    with pytest.raises(SystemExit, match="blocks.0.routing._unit_mapping differs from this model's dtr masks"):
        run_sample(ckpt, tmp_path / "flipped", n=1)


def test_sample_official_rtr_checkpoint_keeps_its_masks(tmp_path, monkeypatch):
    pytest.importorskip("omegaconf")
    # The official R-TR masks come from numpy's unseeded global generator: int(0.6 * 128) = 76 random channels a row.
    rng = np.random.default_rng(7)
    masks = [
        torch.zeros(1000, 128).scatter_(1, torch.from_numpy(rng.random((1000, 128)).argsort(1)[:, :76]), 1.0)
        for _ in range(4)
    ]
    model = official_dit("random")
    ours = [table.clone() for table in model.router.buffers()]  # seeded masks, not the checkpoint's
    ckpt = save_official_ckpt(tmp_path / "rtr.pt", model.state_dict(), masks, official_config(init_method="random"))
    for table, m in zip(model.router.buffers(), masks):  # the reference: our R-TR DiT running the official masks
        table.copy_(m.bool())
    decoder, _ = fake_vae(monkeypatch)
    out = run_sample(ckpt, tmp_path / "out", "--cfg-scale", "1.5", n=4)
    assert np.array_equal(
        out["arr_0"], reference_samples(model, out["arr_1"], range(4), 1.5, schedule="cosine", vae=decoder)
    )
    for table, m in zip(model.router.buffers(), ours):
        table.copy_(m)
    assert not np.array_equal(
        out["arr_0"], reference_samples(model, out["arr_1"], range(4), 1.5, schedule="cosine", vae=decoder)
    )
    masks[2][5, masks[2][5].argmin()] = 1  # a row with 77 channels
    save_official_ckpt(ckpt, model.state_dict(), masks, official_config(init_method="random"))
    with pytest.raises(SystemExit, match=r"blocks.2.routing._unit_mapping is not a 0/1 table with 76 \(= int\(beta"):
        run_sample(ckpt, tmp_path / "bad", n=1)


def test_sample_official_state_dict_without_config(tmp_path, monkeypatch, capsys):
    # An EMA dict alone (e.g. taken out of an official checkpoint): beta and alpha from its masks, the cosine default.
    model = official_dit(alpha=2.0)
    masks = [reference_dtr(1000, 128, 2.0, 0.6)] * 4
    weights = {**model.state_dict(), **{f"blocks.{i}.routing._unit_mapping": m for i, m in enumerate(masks)}}
    torch.save({"ema": weights}, tmp_path / "ema.pt")
    decoder, _ = fake_vae(monkeypatch)
    out = run_sample(tmp_path / "ema.pt", tmp_path / "out", "--model", "DiT-T/2", "--image-size", "64", n=3)
    err = capsys.readouterr().err.splitlines()
    assert (
        "sample.py: warning: the checkpoint has the official DTR code's masks but no config: assuming DTR with "
        "alpha 2, beta 0.6 (from the masks), the cosine schedule (the official default) and 1000 steps" in err
    )
    with open(tmp_path / "out" / "run.json") as f:
        settings = json.load(f)["model_args"]
    assert (settings["routing"], settings["alpha"], settings["beta"], settings["noise_schedule"]) == (
        "dtr",
        2.0,
        0.6,
        "cosine",
    )
    assert np.array_equal(
        out["arr_0"], reference_samples(model, out["arr_1"], range(3), schedule="cosine", vae=decoder)
    )
    # masks that are not DTR's for any alpha (here R-TR's, one table per block) are used as they are
    rng = np.random.default_rng(1)
    masks = [
        torch.zeros(1000, 128).scatter_(1, torch.from_numpy(rng.random((1000, 128)).argsort(1)[:, :76]), 1.0)
        for _ in range(4)
    ]
    torch.save(
        {**model.state_dict(), **{f"blocks.{i}.routing._unit_mapping": m for i, m in enumerate(masks)}},
        tmp_path / "rtr.pt",
    )
    model_args, state = sample.load_checkpoint(str(tmp_path / "rtr.pt"), model="DiT-T/2", image_size=64)
    assert "assuming R-TR with the checkpoint's own masks (not DTR's), beta 0.6" in capsys.readouterr().err
    assert (model_args["routing"], model_args["beta"], model_args["noise_schedule"]) == ("random", 0.6, "cosine")
    loaded = sample.load_model(model_args, state, "cpu")
    assert all(torch.equal(table, m.bool()) for table, m in zip(loaded.router.buffers(), masks))


def test_sample_official_masks_give_beta_and_alpha():
    for active, channels, beta in ((921, 1152, 0.8), (460, 1152, 0.4), (102, 128, 0.8), (76, 128, 0.6), (64, 64, 1.0)):
        assert sample.mask_beta(active, channels) == beta
    for channels in (7, 128, 384, 1152):  # every count has a beta that reproduces it
        assert all(int(sample.mask_beta(n, channels) * channels) == n for n in range(1, channels + 1))
    for alpha in (4.0, 1.0, 2.0, 0.5, 1.5, 3.25):
        assert sample.mask_alpha(reference_dtr(1000, 384, alpha, 0.8).bool(), 0.8) == alpha
    assert sample.mask_alpha(reference_dtr(1000, 384, 4.0, 0.8).flip(1).bool(), 0.8) is None


def test_sample_official_checkpoint_without_omegaconf_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("omegaconf")  # to write the checkpoint
    model = official_dit()
    ckpt = save_official_ckpt(
        tmp_path / "official.pt", model.state_dict(), [reference_dtr(1000, 128, 4.0, 0.6)] * 4, official_config()
    )
    for name in [m for m in sys.modules if m.split(".")[0] == "omegaconf"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if omegaconf were not installed: its import fails
    with pytest.raises(SystemExit) as e:
        run_sample(ckpt, tmp_path / "out")
    assert str(e.value.code) == (
        f"sample.py: error: {ckpt} holds the official DTR code's hydra config (an omegaconf "
        "DictConfig): pip install omegaconf"
    )
    assert not os.path.exists(tmp_path / "out")


# -- Bad input: one line, non-zero exit
@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory):
    """Checkpoints: corrupt bytes, a conditional DiT without a null class, an unconditional one."""
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    for name, kw in (("no-null", dict(class_dropout_prob=0.0)), ("uncond", dict(num_classes=1, class_dropout_prob=0))):
        model = dtr.build_model(dtr.model_args(ckpt_args(**kw)))
        save_train_ckpt(root / f"{name}.pt", ckpt_args(**kw), model.state_dict())
    return root


@pytest.mark.parametrize(
    "ckpt,flags,message",
    [
        ("missing.pt", [], "checkpoint .*missing.pt not found"),
        ("corrupt.pt", [], "cannot read checkpoint"),
        ("no-null.pt", ["--class-labels", "1", "4"], "class label 4 is out of range 0..3"),
        ("no-null.pt", ["--class-labels", "-1"], "class label -1 is out of range"),
        ("no-null.pt", ["--cfg-scale", "1.5"], "trained without label dropout"),
        ("no-null.pt", ["--cfg-scale", "0.5"], "trained without label dropout"),
        ("uncond.pt", ["--cfg-scale", "1.5"], "the model is unconditional"),
        ("no-null.pt", ["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
        ("no-null.pt", ["--num-samples", "0"], "must be positive"),
        ("no-null.pt", ["--sampler", "euler"], "invalid choice: 'euler'"),
        ("no-null.pt", ["--num-sampling-steps", "1001"], "must be in 1..1000"),
        ("no-null.pt", ["--eta", "0.5"], "applies to --sampler ddim only"),
        ("no-null.pt", ["--guided-channels", "0"], "--guided-channels must be in 1..3"),
    ],
)
def test_sample_bad_input_is_one_line(bad_ckpts, tmp_path, ckpt, flags, message):
    argv = ["--ckpt", str(bad_ckpts / ckpt), "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parser().parse_args(argv))
    text = str(e.value.code)
    assert text.startswith("sample.py: error: ") and "\n" not in text
    assert re.search(message, text), text
    assert not os.path.exists(tmp_path / "out")  # nothing written


@pytest.mark.slow
def test_sample_cli_exits_with_one_line(bad_ckpts):
    ckpt = str(bad_ckpts / "no-null.pt")
    cmd = [sys.executable, os.path.join(HERE, "sample.py"), "--ckpt", ckpt, "--class-labels", "9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "sample.py: error: class label 9 is out of range 0..3\n"


#################################################################################
#                            sample.py: text-to-image                           #
#################################################################################


def text_reference(model, args, captions, seeds, cfg_scale=1.0, encoder=None, mask=False):
    """Samples straight from dtr's sampler (not through train.generate): the captions encoded here, CFG by hand."""
    context, key_mask = dtr.TextEncoder(encoder or dtr.DEMO_TEXT_ENCODER).encode(captions)
    kwargs = dict(y=context, **({"context_mask": key_mask} if mask else {}))
    diffusion = dtr.build_diffusion(dtr.model_args(args), str(SAMPLE_STEPS))
    n, c = len(captions), model.in_channels

    def guided(x, t, **kw):  # [cond | null context] in one batch; sigma channels from the conditional half
        both = model(
            torch.cat([x, x]),
            torch.cat([t, t]),
            force_drop_ids=torch.arange(2 * n) >= n,
            **{k: torch.cat([v, v]) for k, v in kw.items()},
        )
        cond, uncond = both.chunk(2)
        return torch.cat([uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = diffusion.p_sample_loop(
        model if cfg_scale == 1.0 else guided, (n, c, 8, 8), model_kwargs=kwargs, generators=gens, clip_denoised=True
    )
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_text_sampling_prompts_and_coco_captions(text_run, tmp_path):
    ckpt, model, args = text_run[3:]
    (tmp_path / "prompts.txt").write_text("a red circle\n\n  a green square  \n")
    plain = run_sample(ckpt, tmp_path / "plain", "--prompts", str(tmp_path / "prompts.txt"), n=5)
    assert sorted(plain) == ["arr_0", "captions"]  # no arr_1: the captions, one per sample, instead
    assert plain["captions"].tolist() == ["a red circle", "a green square"] * 2 + ["a red circle"]
    assert np.array_equal(plain["arr_0"], text_reference(model, args, list(plain["captions"]), range(5)))
    guided = run_sample(ckpt, tmp_path / "guided", "--prompts", str(tmp_path / "prompts.txt"), "--cfg-scale", "4", n=5)
    assert np.array_equal(guided["arr_0"], text_reference(model, args, list(plain["captions"]), range(5), 4.0))
    assert (guided["arr_0"] != plain["arr_0"]).mean() > 0.1
    images = [["a red circle", "a red disc"], ["a blue triangle"], ["a cyan diamond", "x"]]
    _, captions = write_coco(tmp_path, images)
    coco = run_sample(ckpt, tmp_path / "coco", "--captions", captions, "--seed", "3", n=7)  # needs no image files
    assert coco["captions"].tolist() == sample.make_captions(7, 3, coco=images).tolist()
    assert np.array_equal(coco["arr_0"], text_reference(model, args, list(coco["captions"]), range(3, 10)))


def test_text_caption_streams():
    images = [[f"image {j} caption {k}" for k in range(1 + j % 5)] for j in range(100)]
    many, few = sample.make_captions(250, 0, coco=images), sample.make_captions(40, 0, coco=images)
    assert many[:40].tolist() == few.tolist()  # caption i does not depend on N
    first = [int(c.split()[1]) for c in many[:100]]
    assert sorted(first) == list(range(100))  # each pass covers every image once, in a seeded random order
    assert first != list(range(100)) and [int(c.split()[1]) for c in many[100:200]] != first  # reshuffled each pass
    assert all(c in images[int(c.split()[1])] for c in many)
    assert {c.split()[-1] for c in many} == {"0", "1", "2", "3", "4"}  # images with several captions: any of them
    assert sample.make_captions(5, 0, prompts=["a", "b"]).tolist() == ["a", "b", "a", "b", "a"]


@pytest.mark.slow
def test_text_sampling_two_ranks_give_the_same_npz(text_run, tmp_path):
    ckpt = text_run[3]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a yellow ring\na magenta cross\na blue triangle\n")
    one = run_sample(ckpt, tmp_path / "one", "--prompts", str(prompts), "--cfg-scale", "1.5", "--batch-size", "6")
    flags = ["--num-samples", "6", "--batch-size", "1", "--shard-size", "2", "--num-sampling-steps", str(SAMPLE_STEPS)]
    prompt_flags = ["--cfg-scale", "1.5", "--prompts", str(prompts)]
    proc = torchrun("--ckpt", ckpt, "--out", str(tmp_path / "two"), *flags, *prompt_flags, script="sample.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(tmp_path / "two" / "samples_6x8x8x3.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["captions"], two["captions"])
    assert len({im.tobytes() for im in one["arr_0"]}) == 6


def test_text_sampling_bad_input_is_one_line(text_run, bad_ckpts, clip_dir, tmp_path):
    ckpt = text_run[3]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "p.txt").write_text("a red circle\n")
    for path, flags, message in [
        (ckpt, [], "needs its captions: --prompts FILE or --captions"),
        (ckpt, ["--class-labels", "1"], "--class-labels is for class-conditional models"),
        (ckpt, ["--prompts", str(tmp_path / "empty.txt")], "holds no prompts"),
        (ckpt, ["--prompts", str(tmp_path / "none.txt")], "cannot read prompts"),
        (ckpt, ["--captions", str(tmp_path / "p.txt")], "cannot read captions"),
        (
            ckpt,
            ["--prompts", str(tmp_path / "p.txt"), "--text-encoder", clip_dir],
            "is not the one the model was trained",
        ),
        (
            str(bad_ckpts / "no-null.pt"),
            ["--prompts", str(tmp_path / "p.txt")],
            "--prompts and --captions are for text",
        ),
        (str(bad_ckpts / "no-null.pt"), ["--text-encoder", clip_dir], "--text-encoder applies to text-to-image"),
    ]:
        argv = ["--ckpt", path, "--out", str(tmp_path / "out"), "--num-sampling-steps", "2", *flags]
        with pytest.raises(SystemExit) as e:
            sample.main(sample.parser().parse_args(argv))
        text = str(e.value.code)
        assert text.startswith("sample.py: error: ") and "\n" not in text and message in text, text
        assert not os.path.exists(tmp_path / "out")


#################################################################################
#              fid.py: Inception metrics with ADM-evaluator parity              #
#################################################################################


def random_inception(seed=0):
    """The FID network with weights that keep random features non-degenerate through its 94 layers: He-normal
    convolutions and random BatchNorm statistics (randomize's N(0, s^2) weights would shrink them to constants)."""
    inception, g = fid.InceptionV3(), torch.Generator().manual_seed(seed)
    for m in inception.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5
        elif isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data, m.bias.data = 0.5 + torch.rand(n, generator=g), 0.2 * torch.randn(n, generator=g)
            m.running_mean.data = 0.2 * torch.randn(n, generator=g)
            m.running_var.data = 0.5 + torch.rand(n, generator=g)
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = 0.05 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = torch.randn(m.bias.shape, generator=g)
    return inception.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inception():
    return random_inception()


@pytest.fixture(scope="module")
def direct(inception):
    """Three test images and the network's outputs on them in one batch, with Mixed_6d.branch1x1's output."""
    images, captured = _images(3), {}
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("b", o))
    with torch.no_grad():
        out = inception(fid.preprocess(torch.from_numpy(images), "adm"))
    hook.remove()
    return images, out, captured["b"]


@pytest.fixture(scope="module")
def weights_file(inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(inception.state_dict(), path)
    return str(path)


def _images(n, h=32, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# -- Network
def _expected_convs():
    """(name, cin, cout, kh, kw) of every conv, written out from the InceptionV3 architecture (Szegedy et al.)."""
    convs = [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    for b, cin, pool in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
        convs += [
            (f"{b}.branch1x1", cin, 64, 1, 1),
            (f"{b}.branch5x5_1", cin, 48, 1, 1),
            (f"{b}.branch5x5_2", 48, 64, 5, 5),
            (f"{b}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{b}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{b}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{b}.branch_pool", cin, pool, 1, 1),
        ]
    convs += [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    for b, c in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        convs += [
            (f"{b}.branch1x1", 768, 192, 1, 1),
            (f"{b}.branch7x7_1", 768, c, 1, 1),
            (f"{b}.branch7x7_2", c, c, 1, 7),
            (f"{b}.branch7x7_3", c, 192, 7, 1),
            (f"{b}.branch7x7dbl_1", 768, c, 1, 1),
            (f"{b}.branch7x7dbl_2", c, c, 7, 1),
            (f"{b}.branch7x7dbl_3", c, c, 1, 7),
            (f"{b}.branch7x7dbl_4", c, c, 7, 1),
            (f"{b}.branch7x7dbl_5", c, 192, 1, 7),
            (f"{b}.branch_pool", 768, 192, 1, 1),
        ]
    convs += [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    for b, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:
        convs += [
            (f"{b}.branch1x1", cin, 320, 1, 1),
            (f"{b}.branch3x3_1", cin, 384, 1, 1),
            (f"{b}.branch3x3_2a", 384, 384, 1, 3),
            (f"{b}.branch3x3_2b", 384, 384, 3, 1),
            (f"{b}.branch3x3dbl_1", cin, 448, 1, 1),
            (f"{b}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{b}.branch3x3dbl_3a", 384, 384, 1, 3),
            (f"{b}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{b}.branch_pool", cin, 192, 1, 1),
        ]
    return convs


def test_fid_state_dict_matches_pytorch_fid_layout():
    state = fid.InceptionV3().state_dict()
    expected = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for name, cin, cout, kh, kw in _expected_convs():
        expected[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for k in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{name}.bn.{k}"] = (cout,)
        expected[f"{name}.bn.num_batches_tracked"] = ()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(_expected_convs()) == 94 and len(state) == 94 * 6 + 2 == 566
    # pinned; pytorch-fid's FID Inception (which loads the weights file strictly) has the same numbers
    assert state["Mixed_6d.branch7x7_2.conv.weight"].shape == (160, 160, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sum(p.numel() for p in fid.InceptionV3().parameters()) == 23_850_960


def test_fid_specific_blocks():
    net = fid.InceptionV3()
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool
    x = torch.ones(1, 1, 4, 4)  # TF's average pool ignores the zero padding: corners stay 1, not 4/9
    assert torch.equal(fid._avg_pool(x), x)
    assert F.avg_pool2d(x, 3, 1, 1)[0, 0, 0, 0].item() == pytest.approx(4 / 9)


def test_fid_forward_outputs_spatial_order_and_bias_free_logits(inception, direct):
    _, out, b = direct  # b: (3, 192, 17, 17), TF's mixed_6/conv in NCHW
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 2023) and out["logits"].shape == (3, 1008)
    assert b.shape == (3, 192, 17, 17) and b.min() >= 0 and b.std() > 0
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 1, 0), (1, 0, 0, 6), (2, 16, 3, 2), (0, 5, 16, 4)]:
        assert out["spatial"][n, (h * 17 + w) * 7 + c] == b[n, c, h, w]  # flattened in H, W, C order
    assert torch.allclose(out["logits"], out["pool"] @ inception.fc.weight.T)
    assert not torch.allclose(out["logits"], inception.fc(out["pool"]), atol=1e-3)  # the bias is not used


def test_fid_network_runs_channels_last_on_cpu_with_unchanged_features(inception, direct):
    images = direct[0]
    inputs = {}  # every conv's input during compute_features
    hooks = [
        m.register_forward_pre_hook(lambda m, i, name=name: inputs.setdefault(name, i[0]))
        for name, m in inception.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    feats = fid.compute_features(images, inception, batch_size=3)
    for h in hooks:
        h.remove()
    assert len(inputs) == 94 and inputs["Conv2d_1a_3x3.conv"].shape == (3, 3, 299, 299)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs.values())  # set once, kept
    # the old path: NCHW resize and scaling, the network forced onto contiguous NCHW at its first layer
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (3, 3, 32, 40)
    old = (fid.tf1_resize_bilinear(x, (299, 299)) - 128) / 128
    force = inception.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, i: (i[0].contiguous(),))
    with torch.no_grad():
        ref = inception(old)
    force.remove()
    for k, v in ref.items():
        # NHWC and NCHW kernels round apart in each of the 94 layers: ~sqrt(94) eps32 = 1.2e-6 of the largest feature
        assert np.abs(feats[k] - v.numpy()).max() <= 1e-5 * np.abs(v.numpy()).max(), k


# -- Preprocessing
def test_fid_tf1_resize_hand_computed():
    x = torch.tensor([[0.0, 3.0], [6.0, 9.0]])[None, None]
    # src = dst * 2/3 = 0, 2/3, 4/3 -> rows (0, 0, 1), next (1, 1, 1 clamped), weights (0, 2/3, 1/3)
    expected = torch.tensor([[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]])
    assert torch.allclose(fid.tf1_resize_bilinear(x, (3, 3))[0, 0], expected, atol=1e-5)
    assert not torch.allclose(F.interpolate(x, (3, 3), mode="bilinear", align_corners=False)[0, 0], expected)
    row = torch.arange(4.0).reshape(1, 1, 1, 4)  # downscale 4 -> 2: src = 0, 2 (no antialiasing)
    assert fid.tf1_resize_bilinear(row, (1, 2)).flatten().tolist() == [0.0, 2.0]


def test_fid_tf1_resize_identity_and_preprocess_ranges():
    img = torch.from_numpy(_images(1, 299, 299))
    x = img.permute(0, 3, 1, 2).float()
    assert torch.equal(fid.tf1_resize_bilinear(x, (299, 299)), x)
    stripes = torch.stack([torch.full((299, 299), v, dtype=torch.uint8) for v in (0, 128, 255)], -1)[None]
    adm, pt = fid.preprocess(stripes, "adm"), fid.preprocess(stripes, "pytorch-fid")
    assert adm.shape == (1, 3, 299, 299) and adm[0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]
    assert torch.allclose(pt[0, :, 0, 0], torch.tensor([-1.0, 2 * 128 / 255 - 1, 1.0]), atol=1e-6)


def _tf1_resize_reference(x, out_h, out_w):
    """TF1's legacy ResizeBilinear kernel in numpy float32, pixel by pixel: src = dst * float32(in / out), the
    four neighbours, top = tl + (tr - tl) * dx, bottom likewise, out = top + (bottom - top) * dy."""
    x = np.asarray(x, np.float32)  # (N, C, H, W)
    h, w = x.shape[-2:]
    out = np.empty((*x.shape[:2], out_h, out_w), np.float32)
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    for i in range(out_h):
        fy = np.float32(i) * sy
        y0 = int(np.floor(fy))
        y1, dy = min(y0 + 1, h - 1), fy - np.float32(y0)
        for j in range(out_w):
            fx = np.float32(j) * sx
            x0 = int(np.floor(fx))
            x1, dx = min(x0 + 1, w - 1), fx - np.float32(x0)
            top = x[..., y0, x0] + (x[..., y0, x1] - x[..., y0, x0]) * dx
            bottom = x[..., y1, x0] + (x[..., y1, x1] - x[..., y1, x0]) * dx
            out[..., i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize(
    "shape, size", [((2, 3, 7, 5), (23, 31)), ((1, 1, 40, 33), (9, 50)), ((1, 3, 13, 13), (13, 13))]
)
def test_fid_tf1_resize_bit_equal_to_per_pixel_kernel(shape, size):
    g = torch.Generator().manual_seed(0)
    as_uint8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    as_float = torch.rand(shape, generator=g) * 255  # values that round differently under another lerp order
    for x in (as_uint8, as_float, as_float.contiguous(memory_format=torch.channels_last)):
        out = fid.tf1_resize_bilinear(x, size)
        assert out.dtype == torch.float32 and out.shape == (*shape[:2], *size)
        assert np.array_equal(out.numpy(), _tf1_resize_reference(x.float().numpy(), *size))


# -- Features, inputs and the CLI
def test_fid_compute_features_batching_and_sources(inception, direct, tmp_path):
    images, out, _ = direct
    np.savez(tmp_path / "stored.npz", arr_0=images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    os.mkdir(tmp_path / "folder")
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i:03d}.png")
    stored, _ = fid.load_source(str(tmp_path / "stored.npz"))
    assert isinstance(stored, np.memmap)
    for src in ("stored.npz", "compressed.npz", "folder"):
        loaded, given = fid.load_source(str(tmp_path / src), num_workers=2)
        assert given == {} and np.array_equal(loaded[0:3], images)
    feats = fid.compute_features(stored, inception, batch_size=2)  # batches of 2 + 1
    for k, d in fid.FEATURE_DIMS.items():
        assert feats[k].shape == (3, d) and feats[k].dtype == np.float32
        assert np.allclose(feats[k], out[k].numpy(), rtol=1e-4, atol=1e-4)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_fid_reference_batch_statistics_win_over_features(tmp_path):
    rng = np.random.default_rng(0)
    stats = {"mu": rng.normal(size=4), "sigma": np.eye(4), "mu_s": rng.normal(size=3), "sigma_s": 2 * np.eye(3)}
    path = _write_npz(tmp_path / "ref_batch.npz", arr_0=_images(2), **stats)  # ADM reference batch layout
    images, given = fid.load_source(path)
    assert np.array_equal(images, _images(2)) and sorted(given) == sorted(stats)
    feats = {k: rng.normal(size=(6, 4)).astype(np.float32) for k in ("pool", "spatial", "logits")}
    out = fid.statistics(feats, given)
    assert all(np.array_equal(out[k], stats[k]) for k in stats)  # as ADM: the stored mu/sigma are used
    assert out["pool"] is feats["pool"] and out["logits"] is feats["logits"]  # the images still give P/R, IS
    mu, sigma = fid.feature_statistics(feats["pool"])
    assert np.allclose(fid.statistics(feats)["mu"], mu) and np.allclose(fid.statistics(feats)["sigma"], sigma)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), "must be uint8"),
        (dict(arr_0=np.zeros((4, 3, 8, 8), np.uint8)), "NCHW"),
        (dict(arr_0=np.zeros((1, 8, 8, 3), np.uint8)), "at least 2 images"),
        (dict(arr_1=np.zeros((4, 8, 8, 3), np.uint8)), "missing arr_0"),
        (dict(arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(3)), "needs all of mu"),
    ],
)
def test_fid_bad_npz(tmp_path, arrays, message):
    with pytest.raises(fid.InputError, match=message):
        fid.load_source(_write_npz(tmp_path / "bad.npz", **arrays))


def test_fid_bad_files_and_folders(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(fid.InputError, match="cannot read"):
        fid.load_source(str(tmp_path / "garbage.npz"))
    with pytest.raises(fid.InputError, match="no such file"):
        fid.load_source(str(tmp_path / "missing.npz"))
    (tmp_path / "images.txt").write_text("x")
    with pytest.raises(fid.InputError, match="expected an .npz"):
        fid.load_source(str(tmp_path / "images.txt"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_images(1, 8, 8)[0]).save(mixed / "a.png")
    Image.fromarray(_images(1, 8, 9)[0]).save(mixed / "b.png")
    with pytest.raises(fid.InputError, match="differ in size"):
        fid.load_source(str(mixed))
    (mixed / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(fid.InputError, match="cannot read image"):
        fid.load_source(str(mixed))
    Image.fromarray(_images(1, 8, 8)[0]).save(mixed / "b.png")
    (mixed / "c.png").write_bytes((mixed / "a.png").read_bytes()[:60])  # valid header, truncated data
    folder = fid.ImageFiles(str(mixed), num_workers=1)
    with pytest.raises(fid.InputError, match="c.png"):
        folder[0:3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(fid.InputError, match="at least 2 images, got 0"):
        fid.load_source(str(tmp_path / "empty"))


def test_fid_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(fid.InputError, match="cannot read FID Inception weights"):
        fid.load_inception(str(tmp_path / "nope.pth"))
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(fid.InputError, match="not the FID Inception state dict"):
        fid.load_inception(str(tmp_path / "wrong.pth"))

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(fid.InputError, match="--inception-weights") as e:
        fid.load_inception(None)
    assert fid.FID_WEIGHTS_URL in str(e.value) and "\n" not in str(e.value)


def _cli_args(*paths, **kw):
    args = dict(paths=list(paths), save_stats=False, json=None, inception_weights=None, dinov2_weights=None,
                metrics="fid,sfid,is,pr", kid_subsets=100, kid_subset_size=1000, protocol="adm", batch_size=3,
                device="cpu", num_workers=2)  # fmt: skip
    return argparse.Namespace(**{**args, **kw})


def _reference_metrics(ref, smp, k=3):
    """ADM's numbers from two dicts of float features, by textbook formulas in float64."""

    def trace_sqrt(a, b):  # tr (S_a S_b)^1/2 = nuclear norm of Ac Bc^T / sqrt((n_a - 1)(n_b - 1)), exact for n << D
        ac, bc = a - a.mean(0), b - b.mean(0)
        return linalg.svdvals(ac @ bc.T).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))

    def frechet(a, b):
        tr_a, tr_b = (np.cov(x, rowvar=False).trace() for x in (a, b))
        return ((a.mean(0) - b.mean(0)) ** 2).sum() + tr_a + tr_b - 2 * trace_sqrt(a, b)

    ref, smp = ({n: v.astype(np.float64) for n, v in f.items()} for f in (ref, smp))
    p = np.exp(smp["logits"] - smp["logits"].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)  # p(y|x), softmax over the 1008 logits
    kl = (p * (np.log(p) - np.log(p.mean(0)))).sum(1)  # KL(p(y|x) || p(y)), one split
    precision, recall = _brute_force_pr(ref["pool"], smp["pool"], k)
    return {
        "inception_score": math.exp(kl.mean()),
        "fid": frechet(smp["pool"], ref["pool"]),
        "sfid": frechet(smp["spatial"], ref["spatial"]),
        "precision": precision,
        "recall": recall,
    }


@pytest.mark.slow  # four 2048-d matrix square roots on one thread: ~40 s
def test_fid_cli_two_sets_match_reference_formulas_and_saved_stats(inception, weights_file, tmp_path, capsys):
    # uniform colours (+ slight noise), picked so that each set covers only part of the other
    ref_colours = [
        (120, 120, 120),
        (0, 60, 120),
        (120, 60, 60),
        (180, 120, 120),
        (0, 60, 60),
        (0, 0, 120),
        (120, 60, 120),
    ]
    smp_colours = [(0, 180, 180), (180, 60, 180), (120, 180, 120), (0, 120, 60), (60, 180, 120)]
    ref_images, smp_images = (
        np.array(c, np.uint8)[:, None, None] + _images(len(c), seed=s) // 16
        for c, s in ((ref_colours, 1), (smp_colours, 2))
    )
    ref = _write_npz(tmp_path / "ref.npz", arr_0=ref_images)
    os.mkdir(tmp_path / "samples")
    for i, im in enumerate(smp_images):
        Image.fromarray(im).save(tmp_path / "samples" / f"{i:02d}.png")
    with torch.no_grad():  # features of each set in one batch, outside compute_features
        feats = [
            {k: v.numpy() for k, v in inception(fid.preprocess(torch.from_numpy(x))).items()}
            for x in (ref_images, smp_images)
        ]
    expected = _reference_metrics(*feats)
    assert (expected["precision"], expected["recall"]) == (2 / 5, 1 / 7)
    # ADM rounds squared distances through float16 (11 significant bits); here every precision/recall decision
    # clears its threshold by more than 4e-3 of the largest squared norm, so that rounding cannot flip it
    ref_pool, smp_pool = (f["pool"].astype(np.float64) for f in feats)
    d = ((smp_pool[:, None] - ref_pool[None]) ** 2).sum(-1)  # (5, 7)
    r_ref, r_smp = (np.sort(((x[:, None] - x[None]) ** 2).sum(-1), 1)[:, 3] for x in (ref_pool, smp_pool))
    margin = min(np.abs(d - r_ref[None]).min(), np.abs(d.T - r_smp[None]).min())
    assert margin > 4e-3 * max((ref_pool**2).sum(1).max(), (smp_pool**2).sum(1).max())

    stats = str(tmp_path / "ref_stats.npz")
    fid.main(_cli_args(ref, stats, save_stats=True, inception_weights=weights_file))
    with np.load(stats) as z:
        assert sorted(z.files) == sorted(["mu", "sigma", "mu_s", "sigma_s", "pool", "logits"])
        assert z["pool"].shape == (7, 2048) and z["sigma_s"].shape == (2023, 2023)
    results = []
    for ref_source in (ref, stats):
        fid.main(
            _cli_args(
                ref_source, str(tmp_path / "samples"), json=str(tmp_path / "out.json"), inception_weights=weights_file
            )
        )
        out = capsys.readouterr().out
        assert [line.split(":")[0] for line in out.splitlines()[-6:]] == [
            "Inception Score",
            "Inception Score std",
            "FID",
            "sFID",
            "Precision",
            "Recall",
        ]
        results.append(json.loads((tmp_path / "out.json").read_text()))
    assert results[0] == results[1]  # the saved statistics give the numbers of the images they came from
    res = results[0]
    assert res["num_ref"] == 7 and res["num_samples"] == 5 and res["inception_score_std"] == 0.0  # one split
    assert (res["precision"], res["recall"]) == (expected["precision"], expected["recall"])
    # the CLI's batches of 3 round the float32 features apart from one batch, ~sqrt(94) eps32 = 1.2e-6 of a feature
    # after 94 layers, in either; FID ~ |mu_a - mu_b|^2 (2e3 here) moves by 2 * 2 * 1.2e-6 * |mu| / |mu_a - mu_b| (~4)
    assert res["fid"] == pytest.approx(expected["fid"], rel=2e-5)
    assert res["sfid"] == pytest.approx(expected["sfid"], rel=2e-5)
    # IS is close to 1 here: compare its log, E KL ~ 0.004, absolutely. The logits (~30, float32 sums of 2048 terms
    # totalling ~180 in absolute value) are off by ~2 eps32 * 180 = 4e-5 in either batching, and E KL moves by at
    # most 2 E_x sum_y p(y|x) |log(p(y|x) / p(y)) - KL| (~0.05 here) per unit of logit error: 0.05 * 2 * 4e-5 = 4e-6
    assert math.log(res["inception_score"]) == pytest.approx(math.log(expected["inception_score"]), abs=5e-6)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_fid_cli_bad_input_is_one_line(tmp_path):
    bad = _write_npz(tmp_path / "bad.npz", arr_0=np.zeros((4, 8, 8, 3), np.float64))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), bad, bad], capture_output=True, text=True)
    assert proc.returncode == 1
    message = f"fid.py: error: {bad}: arr_0 must be uint8 images in [0, 255], got float64"
    assert proc.stderr.strip().splitlines() == [message]


def test_script_help_keeps_example_lines_and_defines_every_metric():
    for script in (train, sample, fid):
        text = script.parser().format_help()
        description = text[text.index("\n\n") : text.index("options:")]
        lines = description.splitlines()
        assert not [ln for ln in lines if re.search(r"\S {5,}--", ln)]  # no continuation joined into one line
        for ln, nxt in zip(lines, lines[1:]):
            if ln.endswith(" \\"):
                assert nxt.startswith("        ") and nxt.strip(), (script.__name__, ln)  # an indented continuation
    defined = {ln.split()[0] for ln in fid.parser().format_help().splitlines() if re.match(r"  [a-z_0-9]+ {2,}\S", ln)}
    assert defined == set(fid.METRICS)  # each metric --metrics accepts has its own line in fid.py --help


# -- Metrics on synthetic features
def _scipy_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_fid_frechet_distance_closed_forms_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    mu, sigma = fid.feature_statistics(x)
    assert np.allclose(sigma, np.cov(x, rowvar=False, ddof=1)) and np.allclose(mu, x.mean(0))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    shift = rng.normal(size=32)
    assert fid.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)
    d, a, b = 16, 1.5, 0.5  # N(0, a^2 I) vs N(shift, b^2 I): |shift|^2 + d (a - b)^2
    assert fid.frechet_distance(np.zeros(d), a * a * np.eye(d), shift[:d], b * b * np.eye(d)) == pytest.approx(
        shift[:d] @ shift[:d] + d * (a - b) ** 2, rel=1e-12
    )
    y = rng.normal(size=(300, 32)) * 2 + 1
    mu2, sigma2 = fid.feature_statistics(y)
    assert fid.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(_scipy_fid(mu, sigma, mu2, sigma2), rel=1e-6)


def test_fid_frechet_distance_singular_covariance():
    rng = np.random.default_rng(1)
    mu1, s1 = fid.feature_statistics(rng.normal(size=(10, 24)))
    mu2, s2 = fid.feature_statistics(rng.normal(size=(50, 24)))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(s1)  # rank 9: the eigen-decomposition path
    ev = linalg.eigvals(s1 @ s2)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.abs(ev.real)).sum()
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_fid_inception_score():
    assert fid.inception_score(np.zeros((20, 10))) == pytest.approx((1.0, 0.0))
    one_hot = np.tile(1000 * np.eye(7), (3, 1))  # each of 7 classes equally often, fully confident
    assert fid.inception_score(one_hot)[0] == pytest.approx(7.0)
    # splits of 5 in order, last partial: distinct classes (5), one class (1), two classes (2)
    labels = [0, 1, 2, 3, 4] + [3] * 5 + [5, 6]
    mean, std = fid.inception_score(1000 * np.eye(7)[labels], split_size=5)
    assert mean == pytest.approx(8 / 3) and std == pytest.approx(np.std([5, 1, 2]))


def _line(xs):
    return np.array([[x, 0.0] for x in xs], np.float32)  # points on a line, embedded in 2-D


@pytest.mark.parametrize("adm_fp16", [True, False])
def test_fid_precision_recall_constructed(adm_fp16):
    ref, smp = _line([0, 1, 2, 3, 10]), _line([-6, -5, -4, -3, 30, 31, 32, 33])
    # k=3 counting the point itself: r^2 = 4th smallest of its squared distances (incl. 0)
    assert fid._knn_radii(torch.tensor(ref), 3, 10000, adm_fp16).tolist() == [9, 4, 4, 9, 81]
    # precision: only -3 lies in a reference ball (|-3 - 0|^2 = 9 <= 9, on the boundary);
    # recall: only 0 lies in a sample ball (|0 - (-3)|^2 = 9 <= r^2(-3) = 9)
    assert fid.precision_recall(ref, smp, device="cpu", adm_fp16=adm_fp16) == (1 / 8, 1 / 5)
    assert fid.precision_recall(ref, smp, device="cpu", block_size=3, adm_fp16=adm_fp16) == (1 / 8, 1 / 5)


def _brute_force_pr(ref, smp, k=3):
    def d(a, b):
        return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)

    r_ref, r_smp = np.sort(d(ref, ref), 1)[:, k], np.sort(d(smp, smp), 1)[:, k]
    return (d(smp, ref) <= r_ref[None]).any(1).mean(), (d(ref, smp) <= r_smp[None]).any(1).mean()


def test_fid_precision_recall_blocks_and_fp16_fallback():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(60, 8)).astype(np.float32)
    smp = (rng.normal(size=(50, 8)) * 1.3 + 0.3).astype(np.float32)
    exact = fid.precision_recall(ref, smp, device="cpu", adm_fp16=False)
    assert exact == pytest.approx(_brute_force_pr(ref, smp), abs=1e-7) and 0 < exact[0] < 1 and 0 < exact[1] < 1
    assert fid.precision_recall(ref, smp, device="cpu", block_size=7, adm_fp16=False) == exact
    assert fid.precision_recall(ref, smp, device="cpu", block_size=7) == fid.precision_recall(ref, smp, device="cpu")
    big = torch.tensor(ref) * 1000  # squared norms overflow float16: ADM falls back to float32
    assert torch.equal(fid._sq_distances(big, big), fid._sq_distances(big, big, adm_fp16=False))
    small = fid._sq_distances(torch.tensor(ref), torch.tensor(smp))
    assert torch.equal(small, small.half().float()) and small.min() >= 0  # float16 values
    with pytest.raises(fid.InputError, match="more than 3"):
        fid.precision_recall(ref[:3], smp, device="cpu")


# -- KID and FD-DINOv2 (beyond ADM's evaluator)
def _kid_brute_force(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel, pair by pair (Binkowski et al. 2018, Eq. 3)."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    within = sum(k(u[i], u[j]) for u in (x, y) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within - 2 * sum(k(a, b) for a in x for b in y) / m**2


def test_kid_against_brute_force_and_torch_fidelity():
    rng = np.random.default_rng(0)
    ref, smp = rng.normal(0, 1, (9, 5)), rng.normal(0.3, 1.2, (7, 5))
    # subsets of the whole sets: every draw is a permutation, and MMD^2 does not depend on the order
    mean, std = fid.kernel_inception_distance(ref[:7], smp, subsets=3, subset_size=100)
    assert mean == pytest.approx(_kid_brute_force(smp, ref[:7]), rel=1e-12) and std < 1e-12
    # proper subsets: the draws of numpy's RandomState(seed), sample set first
    mean, std = fid.kernel_inception_distance(ref, smp, subsets=4, subset_size=4, seed=5)
    r, mmds = np.random.RandomState(5), []
    for _ in range(4):
        a = smp[r.choice(7, 4, replace=False)]
        mmds.append(_kid_brute_force(a, ref[r.choice(9, 4, replace=False)]))
    assert (mean, std) == pytest.approx((np.mean(mmds), np.std(mmds)), rel=1e-10)
    assert fid.kernel_inception_distance(ref, ref + 5)[0] > 10 * abs(fid.kernel_inception_distance(ref, ref[::-1])[0])
    with pytest.raises(fid.InputError, match="at least 2"):
        fid.kernel_inception_distance(ref, smp[:1])
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    big_ref, big_smp = rng.normal(0, 1, (60, 16)).astype(np.float32), rng.normal(0.2, 1, (50, 16)).astype(np.float32)
    theirs = metric_kid.kid_features_to_metric(
        torch.from_numpy(big_smp), torch.from_numpy(big_ref), kid_subsets=10, kid_subset_size=20, rng_seed=2020,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, verbose=False,
    )  # fmt: skip
    ours = fid.kernel_inception_distance(big_ref, big_smp, subsets=10, subset_size=20)
    assert ours == pytest.approx(
        (theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"]), rel=1e-4
    )


def test_fid_metrics_choice():
    assert fid.parse_metrics("kid, fid") == ("fid", "kid")  # in METRICS order
    assert fid.parse_metrics("fid,sfid,is,pr") == fid.ADM_METRICS
    for bad in ("fid,nope", "", "FID"):
        with pytest.raises(fid.InputError, match="choose from fid,sfid,is,pr,kid,fd_dinov2"):
            fid.parse_metrics(bad)
    line = fid.describe(("fid", "kid", "fd_dinov2"), "adm", 100, 1000)
    assert "fid, kid on FID Inception-v3" in line and "100 subsets of up to 1000" in line and "DINOv2 ViT-L/14" in line
    assert "DINOv2" not in fid.describe(fid.ADM_METRICS)


def _dinov2_hub_keys(depth=24, dim=1024):
    """The state-dict layout of torch.hub's dinov2_vitl14_pretrain.pth, written out: name -> shape."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + 37 * 37, dim), "mask_token": (1, dim),
            "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}  # fmt: skip
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                     b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})  # fmt: skip
    return keys


@pytest.mark.slow
def test_dinov2_matches_timm_with_the_hub_layout_and_position_interpolation():
    ours = randomize(fid.DINOv2(), scale=0.02).eval()
    state = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _dinov2_hub_keys()
    timm = pytest.importorskip("timm")
    g = torch.Generator().manual_seed(0)
    for size in (224, 518):
        theirs = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=size, num_classes=0).eval()
        pos = state["pos_embed"]
        if size == 224:  # DINOv2's own resize (hub code): bicubic by scale factor (16 + 0.1) / 37, no antialias
            grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
            timm_resize = torch.nn.functional.interpolate(
                state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2),
                size=(16, 16),
                mode="bicubic",
                antialias=True,
            )  # timm's own resampling differs: loading through it would not be DINOv2
            assert not torch.allclose(timm_resize, grid, atol=1e-3)
        theirs.load_state_dict({**{k: v for k, v in state.items() if k != "mask_token"}, "pos_embed": pos})
        x = torch.randn(1, 3, size, size, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-4)


def test_dinov2_preprocessing_is_edm2s():
    images = torch.from_numpy(_images(2, 40, 40))
    x = fid.preprocess_dinov2(images)
    assert x.shape == (2, 3, 224, 224)
    flat = torch.full((1, 40, 40, 3), 255, dtype=torch.uint8)  # white stays white after any resize
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(fid.preprocess_dinov2(flat)[0, :, 100, 50], expected)
    resized = torch.nn.functional.interpolate(
        images.permute(0, 3, 1, 2).double(), size=224, mode="bicubic", antialias=True
    )
    # float32 source coordinates (< 40, ulp 4e-6) shift bicubic weights (slope < 1.5) on pixels up to 255 by
    # ~1.5e-3, i.e. 3e-5 after / (255 * 0.224)
    torch.testing.assert_close(x[:, 1].double(), (resized[:, 1] / 255 - 0.456) / 0.224, rtol=0, atol=1e-4)


def test_dinov2_weights_offline_is_one_line(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(fid.InputError, match="--dinov2-weights") as e:
        fid.load_dinov2(None)
    assert "dinov2_vitl14_pretrain.pth" in str(e.value) and "\n" not in str(e.value)
    torch.save({"cls_token": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(fid.InputError, match="not the DINOv2 ViT-L/14 state dict"):
        fid.load_dinov2(str(tmp_path / "wrong.pth"))


# -- torch.distributed: contiguous shards, gathered in input order on every rank
class _IndexNet(torch.nn.Module):
    """Stand-in network whose features are the mean input value of each image."""

    dims = fid.FEATURE_DIMS

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def features(self, images, protocol="adm"):
        return self(fid.preprocess(images, protocol))

    def forward(self, x):
        v = x.mean((1, 2, 3))[:, None]
        return {k: v.expand(-1, d) for k, d in fid.FEATURE_DIMS.items()}


def _gather_worker(rank, world, rendezvous):
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        images = np.arange(5, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)
        feats = fid.compute_features(images, _IndexNet(), batch_size=2)  # shards of 3 and 2 images
        expected = (np.arange(5) - 128) / 128
        for k, d in fid.FEATURE_DIMS.items():
            assert feats[k].shape == (5, d) and np.allclose(feats[k][:, 0], expected), (rank, k, feats[k][:, 0])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fid_compute_features_distributed_gather(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(2, f"file://{tmp_path}/rendezvous"), nprocs=2)


def _fid_ranks(*argv_per_rank, timeout=120, env=None):
    """Run fid.py once per rank of one gloo process group, set up as torchrun would but with no agent to stop the
    others when one fails -> [(exit status, stderr)]; a rank still running after `timeout` seconds (in all) fails
    the test instead of hanging it. `env`: more environment variables."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, argv in enumerate(argv_per_rank):
        rank_env = {
            **os.environ,
            **(env or {}),
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(len(argv_per_rank)),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.join(HERE, "fid.py"), *argv, "--device", "cpu"],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        errs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[1] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running after {timeout} s: the ranks do not agree on the failure")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["rank 0 weights", "rank 1 weights", "rank 1 shard"])
def test_fid_torchrun_failure_on_one_rank_stops_every_rank(weights_file, tmp_path, failing):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(_images(4)):
        Image.fromarray(im).save(folder / f"{i}.png")
    missing = str(tmp_path / "missing.pth")
    weights = {"rank 0 weights": [missing, weights_file], "rank 1 weights": [weights_file, missing]}
    if failing == "rank 1 shard":  # rank 1 reads images 2, 3: a valid header (same size) with truncated data
        (folder / "3.png").write_bytes((folder / "0.png").read_bytes()[:60])
    argv = [
        [str(folder), str(folder), "--inception-weights", w, "--batch-size", "2", "--num-workers", "1"]
        for w in weights.get(failing, [weights_file] * 2)
    ]
    (status0, err0), (status1, err1) = _fid_ranks(*argv)
    assert status0 == status1 == 1 and err1 == ""  # every rank stops; rank 0 alone prints the error
    expected = {
        "rank 0 weights": f"fid.py: error: cannot read FID Inception weights {missing}: ",
        "rank 1 weights": f"fid.py: error: rank 1: cannot read FID Inception weights {missing}: ",
        "rank 1 shard": f"fid.py: error: rank 1: cannot read image {folder / '3.png'}: ",
    }[failing]
    assert err0.splitlines()[-1].startswith(expected) and "Traceback" not in err0, err0  # after a progress bar


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "sample.py", "fid.py", "fid.py without torchrun"])
def test_unexpected_error_on_one_rank_ends_every_rank(script, request, tmp_path):
    # rank 1's every conv2d raises, as a GPU out of memory would: its traceback reaches the console and the job ends
    # with a non-zero status within the timeout (under torchrun its agent stops rank 0; without an agent, rank 0's
    # gloo collective fails once rank 1 has gone, so no rank waits forever)
    failing = failing_on_rank(tmp_path / "site", 1)
    if script.startswith("fid.py"):
        folder = tmp_path / "images"
        folder.mkdir()
        for i, im in enumerate(_images(4)):
            Image.fromarray(im).save(folder / f"{i}.png")
        argv = [str(folder), str(folder), "--inception-weights", request.getfixturevalue("weights_file"),
                "--batch-size", "2", "--num-workers", "1"]  # fmt: skip
    if script == "fid.py without torchrun":
        (status0, err0), (status1, err1) = _fid_ranks(argv, argv, env=failing)
        assert status0 != 0 and status1 != 0, err0
        assert "RuntimeError: simulated out of memory" in err1 and "simulated" not in err0, err1
        return
    if script == "fid.py":
        argv = [*argv, "--device", "cpu"]
    elif script == "train.py":
        argv = [*TINY_TRAIN, "--steps", "2", "--results-dir", str(tmp_path / "res")]
    else:
        argv = ["--ckpt", request.getfixturevalue("fitted_dit")[0], "--out", str(tmp_path / "out"), "--num-samples",
                "4", "--shard-size", "2", "--num-sampling-steps", "2"]  # fmt: skip
    r = torchrun(*argv, script=script, timeout=120, env=failing)
    assert r.returncode != 0 and "[rank1]: RuntimeError: simulated out of memory" in r.stderr, r.stderr[-3000:]
