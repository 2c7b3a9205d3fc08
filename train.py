"""Train a diffusion model with Denoising Task Routing, on one process or many (torchrun, DDP).

    python train.py                                   # CPU demo: tiny DTR model on built-in coloured shapes
    python train.py --text-demo                       # the same, text-to-image: captions through a tiny CLIP
    torchrun --nnodes=1 --nproc_per_node=8 train.py --data /path/to/imagenet/train --model DiT-L/2 \\
        --image-size 256 --vae ema --routing dtr --loss-weight ant-uw --latents /path/to/imagenet-latents
    torchrun --nproc_per_node=8 train.py --data coco/train2014 --captions coco/annotations/captions_train2014.json \\
        --model DiT-L/2 --image-size 256 --vae ema --cache-text coco/clip-cache   # text-to-image (MS-COCO)

With --data the defaults are the paper's (App. C): DiT-L/2 on 256 px images in Stable Diffusion's latent space
(--vae ema for a DiT above 64 px; --vae none for pixels), AdamW 1e-4, no weight decay, global batch 256, flips,
T=1000, cosine schedule, learned sigma, EMA 0.9999, label dropout 0.1. Without --data the demo preset (DEMO below)
fills every flag that was not given. --latents DIR encodes every image (and its flip) once and trains from DIR.
--eval-every STEPS --eval REF scores the EMA model during training as `sample.py --eval` would; every log line and
score also goes to metrics.jsonl (MetricsLog), whose curves `python dtr.py plot RUN_DIR ...` draws.
"""

import argparse
import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dtr
import fid

# fmt: off
PAPER = dict(model="DiT-L/2", image_size=256, global_batch_size=256, lr=1e-4, ema_decay=0.9999, steps=400_000,
             log_every=100, ckpt_every=50_000, sample_every=0, num_workers=4)
PIXEL_DIT_MAX = 64  # with --data, a DiT on larger images defaults to --vae ema (the paper's latent DiTs)
DEMO = dict(model="DiT-T/2", image_size=16, global_batch_size=64, lr=2e-3, ema_decay=0.995, steps=2400,
            log_every=100, ckpt_every=800, sample_every=0, num_workers=0)
# fmt: on
# Arguments a resumed run must keep besides dtr.MODEL_ARGS: the data order and the per-step random draws (seed,
# global batch, flips, the demo's data) and the loss. A resume is bit-exact only with them unchanged, and a run that
# changed them halfway would be neither of the two experiments. Every other flag (lr, weight decay, uw-lr, EMA decay,
# steps, log, checkpoint and sample intervals, precision, compile, workers, ...) is applied and its change logged.
RESUME_FIXED = (
    "seed",
    "global_batch_size",
    "flip_prob",
    "demo_images_per_class",
    "loss_weight",
    "min_snr_gamma",
    "p2_gamma",
    "p2_k",
    "uw_clusters",
)
GRID_MIN_WIDTH = 512  # training grids are upscaled (nearest neighbour, integer factor) to at least this many pixels
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COLLECTIVE_TIMEOUT = timedelta(hours=2)  # ranks wait this long at a collective: rank 0 may download network weights
EVAL_CFG_SCALE = 1.5  # --eval-cfg-scale's default: the paper's FID guidance (models with a null class)
PR_NEIGHBOURS = 3  # fid.evaluate's k: precision and recall need more images than this in each set
PEAK_MEMORY = {  # what metrics.jsonl's peak_memory_bytes measures, per device type
    "cuda": "cuda max_memory_allocated since the previous train record or evaluation",
    "cpu": "peak resident set size of the process so far (getrusage ru_maxrss)",
}


#################################################################################
#                                 Training loop                                 #
#################################################################################


def train(args):
    """Train, log and checkpoint as `args` say; returns the experiment directory.

    Bad input stops with one line before any step (an unreadable image: when it is loaded); a non-finite loss stops
    training naming the step, so the last checkpoint is the last good one."""
    # set-up: processes, data, model and optimizer (new, initialised or resumed), experiment folder
    with dtr.shared_errors():  # the same checks on every rank: one line, from rank 0, before anything is written
        run = setup(args)
        data = load_training_data(args, run)
        metrics = eval_metrics(args)
        ckpt, notes = resume_checkpoint(args)
        state = init_state(args, run, ckpt)
        vae = dtr.load_vae(args.vae, args.vae_path, run.device) if args.vae else None
    evaluation = setup_eval(args, run, metrics)  # a bad REF or missing Inception weights stop here (fid.py's checks)
    exp, log = open_experiment(args, run, data, state, ckpt is not None, notes)
    if evaluation is not None:  # the steps metrics.jsonl already holds a score for: a resumed run skips them
        settings = eval_settings(args, evaluation.metrics)
        evaluation.done = dtr.from_rank0(lambda: scored_steps(exp, settings, state.step), run.rank, run.world)
    net = (
        DDP(state.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        if run.world > 1
        else state.model
    )
    net = torch.compile(net) if args.compile else net
    diffusion = dtr.build_diffusion(dtr.model_args(args), **loss_weighting(args))
    if args.latents:  # from here on no image is read and no encoder runs
        data.dataset, data.latents = prepare_latents(args, run, data.dataset, vae), True
    batches = iter(make_loader(args, run, data.dataset, state.step))
    meter = Meter(args, run, log, exp, state.step)
    try:
        evaluate_if_due(args, run, evaluation, state, vae, meter)  # the resumed step's, if it was cut short
        while state.step < args.steps:
            # one step: this rank's batch and its share of the step's draws -> loss, backward, AdamW, EMA
            draws = step_randomness(args, state.step, run)
            x, kwargs = model_inputs(args, run, data, vae, next_batch(batches), draws)
            losses, loss, grad_norm = train_step(args, run, net, diffusion, state, x, draws, kwargs)
            # log and save
            meter.update(state.step, draws["t"], losses, loss, state.uw, grad_norm)
            if state.step % args.ckpt_every == 0 or state.step == args.steps:
                log(f"saved {save_checkpoint(args, run, exp, state)}")
            if run.rank == 0 and (
                args.sample_every and state.step % args.sample_every == 0 or state.step == args.steps
            ):
                log(f"saved {save_training_grid(args, exp, state.step, state.ema, vae, run.device, data)}")
            evaluate_if_due(args, run, evaluation, state, vae, meter)
    finally:  # errors then print on a line of their own
        meter.close()
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return exp


def loss_weighting(args):
    """The per-sample MSE weight of GaussianDiffusion (ANT-UW weighs its timestep clusters afterwards)."""
    weight = args.loss_weight if args.loss_weight in ("min-snr", "p2") else "constant"
    return dict(loss_weight=weight, min_snr_gamma=args.min_snr_gamma, p2_gamma=args.p2_gamma, p2_k=args.p2_k)


def make_loader(args, run, dataset, step):
    """This rank's batches of every global batch from `step` on (see StepBatches)."""
    sampler = StepBatches(len(dataset), args.global_batch_size, run.rank, run.world, args.seed, step)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=args.num_workers > 0,
    )


def next_batch(batches):
    """The next (images, labels); an unreadable image, also in a loader worker, stops with one line."""
    try:
        return next(batches)
    except Exception as e:  # the last line of a worker's re-raised traceback is the error; its type if it has none
        lines = str(e).strip().splitlines()
        raise dtr.InputError(lines[-1] if lines else f"cannot load a batch ({type(e).__name__})") from None


def step_randomness(args, step, run):
    """This rank's share of all random draws of one global batch, from a generator seeded by (seed, step).

    Drawing per global batch rather than per rank makes training independent of how the batch is split over
    ranks: any world size sees the same timesteps, noise, flips, label drops, VAE posterior noise and captions for
    global sample i, and the data order (StepBatches) is seeded the same way. So N processes train the weights of one
    (up to float summation order), and a resumed run is bit-identical on the CPU. The exception is a model with dropout
    (ADM-64): its dropout masks come from each rank's own RNG stream (seeded in setup(), saved in checkpoints), so they
    change with the world size; a resume on the same world size stays bit-identical."""
    g = torch.Generator(run.device).manual_seed(args.seed * 2**32 + step)
    n, side = args.global_batch_size, dtr.latent_size(dtr.model_args(args))
    shape = (4 if args.vae else 3, side, side)
    clusters = args.uw_clusters if args.loss_weight == "ant-uw" else None
    draws = dict(
        t=dtr.sample_timesteps(n, args.num_timesteps, clusters, run.device, g),
        noise=torch.randn(n, *shape, generator=g, device=run.device),
        flip=torch.rand(n, generator=g, device=run.device) < args.flip_prob,
        drop=torch.rand(n, generator=g, device=run.device) < args.class_dropout_prob,
    )
    if args.vae:
        draws["posterior"] = torch.randn(n, *shape, generator=g, device=run.device)  # z = mean + std * noise
    if args.context_dim is not None:  # which of its captions each image gets this time
        draws["caption"] = torch.rand(n, generator=g, device=run.device, dtype=torch.float64)
    return {k: v[run.part] for k, v in draws.items()}


def model_inputs(args, run, data, vae, batch, draws):
    """The network's input (pixels in [-1, 1] or VAE latents) and condition for this rank's batch (images or cached
    latents, y)."""
    x, y = batch
    if data.latents:
        x = cached_latents(x.to(run.device, non_blocking=True), draws)
    else:
        x = x.to(run.device, non_blocking=True).float() / 127.5 - 1  # uint8 -> [-1, 1]
        x = torch.where(draws["flip"][:, None, None, None], x.flip(3), x)  # random horizontal flip
    if vae is not None and not data.latents:
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            x = (post.mean + post.std * draws["posterior"]) * dtr.VAE_SCALE
    if data.text is not None:  # y holds image indices: pick this step's captions and encode them (no grad)
        context, mask = data.text(pick_captions(data.captions, y, draws["caption"]))
        return x, dict(y=context, force_drop_ids=draws["drop"], **({"context_mask": mask} if args.text_mask else {}))
    return x, ({} if args.num_classes == 1 else dict(y=y.to(run.device), force_drop_ids=draws["drop"]))


def train_step(args, run, net, diffusion, state, x, draws, kwargs):
    """One optimisation step -> this rank's per-sample losses (N,), the loss it minimised and the model's gradient
    norm (all detached).

    --grad-accum A runs the batch as A micro-batches of N / A samples, one forward and backward each, gradients
    summed; DDP all-reduces once, in the last backward (no_sync before). The loss is linear in the per-sample losses
    with weights from the whole batch (sample_weights), so the micro-batches' losses add up to the batch's and the
    update is the global batch's for any A, up to the order of float sums. The gradient norm is the total L2 norm of
    the model's gradients (ANT-UW's log-variances not included) after fp16 unscaling, before clipping
    (--max-grad-norm) and AdamW."""
    state.opt.zero_grad(set_to_none=True)
    micro = len(x) // args.grad_accum
    losses, loss = [], 0.0
    for j in range(args.grad_accum):
        part = slice(j * micro, (j + 1) * micro)
        last = j == args.grad_accum - 1
        with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with torch.autocast(
                run.device.type, dtype=AMP_DTYPES.get(args.precision), enabled=args.precision != "fp32"
            ):
                terms = diffusion.training_losses(
                    net, x[part], draws["t"][part], {k: v[part] for k, v in kwargs.items()}, draws["noise"][part]
                )
            part_losses = terms["loss"].float()  # (N / A,)
            weights, constant = sample_weights(args, draws["t"], state.uw)  # per micro-batch: each backward frees it
            part_loss = (weights[part] * part_losses).sum() + (constant if j == 0 else 0)
            state.scaler.scale(part_loss).backward()
        losses.append(part_losses.detach())
        loss = loss + part_loss.detach()
    if state.uw is not None:  # the log-variances live outside DDP: average their gradients by hand
        all_reduce_mean(state.uw.grad, run.world)
    state.scaler.unscale_(state.opt)  # the true gradients, to measure and clip (a no-op unless fp16)
    params = [p for p in state.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if args.max_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, args.max_grad_norm, grad_norm)
    state.scaler.step(state.opt)
    state.scaler.update()
    update_ema(state.ema, state.model, args.ema_decay)
    state.step += 1
    return torch.cat(losses), loss, grad_norm.detach()


def sample_weights(args, t, uw):
    """Weights (N,) and a constant: this rank's loss is (weights * losses).sum() + constant -- the mean, or ANT-UW with
    its cluster means over the whole batch t (dtr.uncertainty_weights)."""
    if uw is None:
        return torch.full(t.shape, 1 / len(t), device=t.device), 0.0
    return dtr.uncertainty_weights(t, uw, args.num_timesteps)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


#################################################################################
#                  Set-up: processes, data, model and optimizer                 #
#################################################################################


@dataclass
class Run:
    """This process: its rank among `world`, its device, and its slice of every global batch."""

    rank: int
    world: int
    device: torch.device
    part: slice


@dataclass
class TrainingData:
    """The images (uint8, with labels or image indices) and, for text-to-image, captions and their frozen encoder."""

    dataset: torch.utils.data.Dataset
    captions: list = None
    text: dtr.TextEncoder = None
    latents: bool = False  # the dataset is a LatentData: cached posterior moments instead of images


@dataclass
class State:
    """What training changes and a checkpoint keeps: weights, their EMA, the optimizer (with ANT-UW's log-variances
    uw), the fp16 loss scaler and the step."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    uw: torch.nn.Parameter
    scaler: torch.amp.GradScaler
    step: int = 0


def setup(args):
    """Join torchrun (or run alone), check the batch against the world size, and seed this rank's dropout stream."""
    rank, world, device = dtr.setup_distributed(timeout=COLLECTIVE_TIMEOUT)
    if args.global_batch_size % world:
        raise dtr.InputError(f"global batch size {args.global_batch_size} is not divisible by the world size {world}")
    local = args.global_batch_size // world
    if args.loss_weight == "ant-uw" and local % args.uw_clusters:
        raise dtr.InputError(
            f"per-rank batch {local} is not divisible by the {args.uw_clusters} ANT-UW timestep clusters"
        )
    if local % args.grad_accum:
        raise dtr.InputError(
            f"per-rank batch {local} is not divisible into --grad-accum {args.grad_accum} micro-batches"
        )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed * world + rank)  # per-rank stream for dropout; batch draws are per step
    return Run(rank, world, device, slice(rank * local, (rank + 1) * local))


def load_training_data(args, run):
    """The data; it decides args.num_classes, args.data_source (the images' count and digest, which a resume checks)
    and, for text, the encoder's identity (args.context_dim, text_*)."""
    args.context_dim = args.text_digest = args.text_length = None
    if args.text_encoder is None:
        dataset, args.num_classes = load_data(args)
        data = TrainingData(dataset)
        if args.num_classes == 1:  # no labels to drop: no null-class row, as the official DTR code does
            args.class_dropout_prob = 0.0
    else:  # text-to-image: the condition is a caption, through the frozen encoder
        (dataset, captions), args.num_classes = load_text_data(args), 1
        data = TrainingData(dataset, captions, dtr.TextEncoder(args.text_encoder, run.device, args.cache_text))
        args.context_dim, args.text_digest, args.text_length = data.text.dim, data.text.digest, data.text.length
    if len(dataset) < args.global_batch_size:
        raise dtr.InputError(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    args.data_source = source_record(dataset, args.data)
    return data


def init_state(args, run, ckpt=None):
    """Model, EMA, AdamW (ANT-UW's log-variances in their own group) and loss scaler: new, from --init-from, or
    resumed from `ckpt`."""
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, for any world size: each
        torch.default_generator.manual_seed(args.seed)  # rank's EMA (--eval-every samples it) starts as DDP's weights
        model = dtr.build_model(dtr.model_args(args), use_checkpoint=args.grad_ckpt).to(run.device)
    multiple = size_multiple(model)
    if model.input_size % multiple:
        raise dtr.InputError(f"input side {model.input_size} is not divisible by {multiple}, which {args.model} needs")
    if args.init_from:
        load_weights(model, args.init_from)
    uw = torch.nn.Parameter(torch.zeros(args.uw_clusters, device=run.device)) if args.loss_weight == "ant-uw" else None
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if uw is not None:  # ANT-UW log-variances s_k: their own group, lr 0.025 and no weight decay
        groups.append({"params": [uw], "lr": args.uw_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(
        groups,
        lr=args.lr,
        weight_decay=args.weight_decay,
        **({"fused": True} if run.device.type == "cuda" else {"foreach": True}),
    )
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.precision == "fp16")
    state = State(model, deepcopy(model).requires_grad_(False), opt, uw, scaler)  # EMA starts from the model
    if ckpt is not None:
        restore(state, ckpt, args, run)
    return state


def load_weights(model, path):
    """--init-from: model weights only (EMA if the checkpoint has them), keys matched strictly."""
    sd = dtr.read_checkpoint(path)
    sd = sd.get("ema", sd.get("model", sd)) if isinstance(sd, dict) and ("ema" in sd or "model" in sd) else sd
    try:
        model.load_state_dict(clean_state_dict(sd), strict=True)
    except RuntimeError as e:
        raise dtr.InputError(f"--init-from {path} does not match the model: {str(e).splitlines()[1].strip()}") from None


def size_multiple(model):
    """What the network's input side must be a multiple of: DiT's patch size, or the UNet's total downsampling."""
    if isinstance(model, dtr.DiT):
        return model.patch_size
    return 2 ** sum(
        isinstance(m, dtr.Downsample) or isinstance(m, dtr.ResBlock) and m.updown == "down" for m in model.modules()
    )


def all_reduce_mean(x, world):
    """Mean of a tensor over ranks (a no-op on one process)."""
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


#################################################################################
#                                      Data                                     #
#################################################################################

SHAPES = ("red circle", "green square", "blue triangle", "yellow ring", "magenta cross", "cyan diamond")


SHAPE_COLORS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (210, 50, 200), (40, 200, 210))


SHAPE_CAPTIONS = tuple((f"a {s}", f"a picture of a {s}") for s in SHAPES)  # --text-demo: two captions per shape


def make_shapes(num_per_class, image_size, seed=0):
    """Built-in demo data: uint8 images (N, 3, S, S) of one coloured shape per class, and labels (N,).

    Six classes (SHAPES), num_per_class images each, deterministic from `seed`; every shape fills most of the frame."""
    g = torch.Generator().manual_seed(seed)
    n = num_per_class * len(SHAPES)
    labels = torch.arange(len(SHAPES)).repeat_interleave(num_per_class)
    grid = (torch.arange(image_size) + 0.5) / image_size
    center = 0.4 + 0.2 * torch.rand(n, 2, 1, 1, generator=g)  # (N, 2, 1, 1): x, y
    r = 0.3 + 0.08 * torch.rand(n, 1, 1, generator=g)  # (N, 1, 1): shapes fill most of the frame, never leave it
    dx, dy = grid[None, None, :] - center[:, 0], grid[None, :, None] - center[:, 1]  # (N, S, S)
    dist = (dx**2 + dy**2).sqrt()
    inside = torch.stack(
        [
            dist <= r,  # circle
            torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r,  # square
            (dy <= 0.7 * r) & (dx.abs() <= 0.6 * (dy + r)),  # triangle, apex up
            (dist <= r) & (dist >= 0.55 * r),  # ring
            ((dx.abs() <= 0.3 * r) & (dy.abs() <= r)) | ((dy.abs() <= 0.3 * r) & (dx.abs() <= r)),  # cross
            dx.abs() + dy.abs() <= r,  # diamond
        ]
    )[labels, torch.arange(n)]  # (N, S, S)
    color = torch.tensor(SHAPE_COLORS, dtype=torch.float32)[labels] + 20 * torch.randn(n, 3, generator=g)
    background = 20 + 40 * torch.rand(n, 1, generator=g)
    img = torch.where(inside[:, None], color[:, :, None, None], background[:, :, None, None])
    return img.round().clamp(0, 255).to(torch.uint8), labels


def center_crop(image, size):
    """ADM's resize: halve with a box filter while >= 2x too big, bicubic to `size` on the short side, center crop."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return torch.from_numpy(arr[top : top + size, left : left + size].copy()).permute(2, 0, 1)  # (3, S, S) uint8


class ImageData(torch.utils.data.Dataset):
    """uint8 images (3, S, S) and integer labels, from (path, label) files or arrays (N, H, W, 3) with labels (N,)."""

    def __init__(self, images=None, labels=None, files=None, size=None):
        self.images, self.labels, self.files, self.size = images, labels, files, size

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        if self.files is not None:  # (path, class) pairs
            path, label = self.files[i]
            return center_crop(dtr.open_image(path), self.size), label
        img = np.asarray(self.images[i])  # (H, W, 3)
        if img.shape[:2] != (self.size, self.size):
            return center_crop(Image.fromarray(img), self.size), int(self.labels[i])
        return torch.from_numpy(img.copy()).permute(2, 0, 1), int(self.labels[i])


def load_data(args):
    """(dataset, num_classes) for --data: None (built-in shapes), an image folder, an ADM-style .npz or an .npy.

    An image folder is class-conditional when it has more than one class folder; an .npy is unconditional;
    --unconditional drops the labels of any source. Images are resized as ADM does (center_crop) when loaded."""
    if args.data is None:
        images, labels = make_shapes(args.demo_images_per_class, args.image_size, args.seed)
        data = ImageData(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), size=args.image_size)
        return data, 1 if args.unconditional else len(SHAPES)
    if not os.path.exists(args.data):
        raise dtr.InputError(f"--data {args.data} does not exist")
    if args.data.endswith((".npz", ".npy")):
        return load_npz(args)
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(args.data)
    except (FileNotFoundError, OSError) as e:
        raise dtr.InputError(f"no images found in {args.data} ({e})")
    classes = 1 if args.unconditional or len(folder.classes) == 1 else len(folder.classes)
    files = folder.samples if classes > 1 else [(p, 0) for p, _ in folder.samples]
    return ImageData(files=files, size=args.image_size), classes


def load_npz(args):
    """An ADM-style .npz (arr_0 uint8 (N, H, W, 3), optional arr_1 integer labels (N,)), or a .npy of images only.

    The images are memory-mapped: ranks and loader workers share the page cache instead of each holding a copy. That
    needs the .npz stored uncompressed (np.savez, as ADM's are): a np.savez_compressed one is refused with a one-line
    command that rewrites it uncompressed."""
    try:
        if args.data.endswith(".npy"):
            images, labels = np.load(args.data, mmap_mode="r"), None
        else:
            with np.load(args.data) as z:
                labels = z["arr_1"] if "arr_1" in z.files else None
            images = dtr.memmap_npz(args.data, "arr_0")
    except Exception as e:
        raise dtr.InputError(f"cannot read {args.data} as an .npz with arr_0 or an .npy ({type(e).__name__}: {e})")
    if images is None:
        stored = args.data[: -len(".npz")] + "-stored.npz"
        raise dtr.InputError(
            f"{args.data} is compressed (np.savez_compressed) and cannot be memory-mapped; store it "
            f"uncompressed once: python -c \"import numpy as np; np.savez('{stored}', "
            f"**np.load('{args.data}'))\""
        )
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise dtr.InputError(
            f"{args.data}: arr_0 must be non-empty uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    if labels is None or args.unconditional:
        return ImageData(images, np.zeros(len(images), dtype=np.int64), size=args.image_size), 1
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise dtr.InputError(
            f"{args.data}: arr_1 must hold one non-negative integer label per image, got {labels.dtype} {labels.shape}"
        )
    return ImageData(images, labels, size=args.image_size), int(labels.max()) + 1


def load_text_data(args):
    """(dataset of (image, index), the captions of every image) for --text-demo or --data DIR --captions JSON."""
    if args.captions is None:  # the demo: every shape gets the captions of its class
        images, labels = make_shapes(args.demo_images_per_class, args.image_size, args.seed)
        data = ImageData(images.permute(0, 2, 3, 1).numpy(), np.arange(len(labels)), size=args.image_size)
        return data, [SHAPE_CAPTIONS[k] for k in labels.tolist()]
    if args.data is None or not os.path.isdir(args.data):
        raise dtr.InputError(f"--captions needs --data DIR, the folder of the images it names (got {args.data})")
    entries = dtr.read_coco_captions(args.captions)
    missing = [name for name, _ in entries if not os.path.isfile(os.path.join(args.data, name))]
    if missing:
        raise dtr.InputError(
            f"{len(missing)} of the {len(entries)} images of {args.captions} are not in {args.data} (e.g. {missing[0]})"
        )
    files = [(os.path.join(args.data, name), i) for i, (name, _) in enumerate(entries)]  # label: the image's index
    return ImageData(files=files, size=args.image_size), [c for _, c in entries]


def pick_captions(captions, index, u):
    """Caption of each image index (N,): one of its captions, chosen by a uniform draw u (N,) in [0, 1)."""
    return [captions[i][int(v * len(captions[i]))] for i, v in zip(index.tolist(), u.tolist())]


class StepBatches(torch.utils.data.Sampler):
    """This rank's indices of every global batch from `start` on; epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, size, global_batch, rank, world, seed, start):
        self.size, self.global_batch, self.rank, self.world, self.seed, self.start = (
            size,
            global_batch,
            rank,
            world,
            seed,
            start,
        )

    def __iter__(self):
        per_epoch, local = self.size // self.global_batch, self.global_batch // self.world
        epoch, perm = None, None
        for step in range(self.start, 2**62):
            e, i = divmod(step, per_epoch)
            if e != epoch:  # drop_last: a global batch never spans two epochs
                epoch, perm = (
                    e,
                    torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 2**20 + e)),
                )
            batch = perm[i * self.global_batch : (i + 1) * self.global_batch]
            yield batch[self.rank * local : (self.rank + 1) * local].tolist()


#################################################################################
#          Latent cache: every image and its flip through the VAE once          #
#################################################################################

# A cache folder (--latents DIR) holds shard_00000.npy, shard_00001.npy, ...: float32 (n, F, 2, C, S/8, S/8) with
# n = --latent-shard-size images, F = 2 (the image, then its horizontal flip; 1 if built with --flip-prob 0) and
# 2 = the VAE posterior's (mean, std), not one frozen sample; 64 KiB per image at 256 px with flips. cache.json,
# written atomically and last, records how it was made (cache_record). Labels are not cached but taken from the data
# set's listing, so one cache serves class-conditional, --unconditional and text-to-image runs on the same images.
CACHE_FORMAT = 1  # version of the layout below


CACHE_PREPROCESSING = "adm-center-crop"  # center_crop() above: rename this when it changes, so old caches are refused


ENCODE_BATCH = 32  # images per VAE call while building a cache (64 with their flips)


OPEN_SHARDS = 64  # memory maps a LatentData keeps open (each holds a file descriptor)


def source_record(dataset, root):
    """{count, digest} of the images a dataset reads: its files (paths relative to root), or its array's shape and
    three of its images (hashing every image would read them all)."""
    h = hashlib.sha256()
    if dataset.files is not None:
        for path, _ in dataset.files:
            h.update(os.path.relpath(path, root).encode() + b"\n")
    else:
        images = dataset.images
        h.update(f"{tuple(images.shape)} {images.dtype}".encode())
        for i in sorted({0, len(images) // 2, len(images) - 1}):
            h.update(np.ascontiguousarray(images[i]).tobytes())
    return {"count": len(dataset), "digest": h.hexdigest()[:16]}


def dataset_labels(dataset):
    """The label of every image of an ImageData (N,), read without opening an image."""
    if dataset.files is not None:
        return np.array([label for _, label in dataset.files], dtype=np.int64)
    return np.asarray(dataset.labels)


def cache_record(args, dataset, vae):
    """What a cache holds and how it was made; cache.json. Per image: (F, 2, C, h, w) float32, F = 2 with flips
    (the image, then its horizontal flip), 2 = the VAE posterior's mean and std."""
    side, channels, flips = args.image_size // dtr.VAE_FACTOR, vae.config.latent_channels, args.flip_prob > 0
    return {
        "format": CACHE_FORMAT,
        "vae": {
            "kind": args.vae,
            "path": args.vae_path,
            "digest": dtr.weights_digest(vae),
            "latent_channels": channels,
        },
        "image_size": args.image_size,
        "preprocessing": CACHE_PREPROCESSING,
        "flips": flips,
        "source": {"path": args.data, **source_record(dataset, args.data)},
        "layout": "shard_NNNNN.npy: (images, F, 2, C, h, w); F: the image, then its flip; 2: posterior mean, std",
        "dtype": "float32",
        "shape": [1 + flips, 2, channels, side, side],
        "shard_size": args.latent_shard_size,
        "num_shards": math.ceil(len(dataset) / args.latent_shard_size),
    }


def check_record(found, want, args):
    """Stop with one line where the cache's record `found` disagrees with this run's `want`."""
    cache, data = f"--latents {args.latents}", args.data or "the built-in shapes"
    fix = f"pass a new --latents DIR (or delete {args.latents}) to encode anew"
    if found.get("format") != CACHE_FORMAT:
        raise dtr.InputError(
            f"{cache} has cache format {found.get('format')!r}, this train.py reads {CACHE_FORMAT}: {fix}"
        )
    vae = found["vae"]
    if vae["digest"] != want["vae"]["digest"]:
        path = f" --vae-path {vae['path']}" if vae["path"] else ""
        raise dtr.InputError(
            f"{cache} holds latents of another VAE (--vae {vae['kind']}{path}, weights {vae['digest']}; this one's "
            f"are {want['vae']['digest']}): pass that VAE, or {fix}"
        )
    if found["image_size"] != want["image_size"]:
        raise dtr.InputError(
            f"{cache} holds {found['image_size']} px images, not --image-size {want['image_size']}: "
            f"pass --image-size {found['image_size']}, or {fix}"
        )
    if found["preprocessing"] != want["preprocessing"]:
        raise dtr.InputError(
            f"{cache} was made with preprocessing {found['preprocessing']!r}, this train.py does "
            f"{want['preprocessing']!r}: {fix}"
        )
    if want["flips"] and not found["flips"]:
        raise dtr.InputError(
            f"{cache} was built without flips but --flip-prob is {args.flip_prob}: pass --flip-prob 0, or {fix}"
        )
    if found["source"]["count"] != want["source"]["count"]:
        raise dtr.InputError(
            f"{data} holds {want['source']['count']:,} images but {cache} was built from "
            f"{found['source']['count']:,}: the source changed since; {fix}"
        )
    if found["source"]["digest"] != want["source"]["digest"]:
        raise dtr.InputError(
            f"the images of {data} are not those {cache} was built from (other names or contents): {fix}"
        )


def latent_shard_file(directory, k):
    return os.path.join(directory, f"shard_{k:05d}.npy")


def shard_problem(path, shape):
    """Why the file at `path` is not a complete float32 .npy of `shape` (truncated, corrupt, other), or None."""
    try:
        with open(path, "rb") as f:
            found, fortran, dtype = dtr.NPY_HEADER_READERS[np.lib.format.read_magic(f)](f)
            offset = f.tell()
        size = os.path.getsize(path)
    except Exception as e:  # a bad magic string or header, or an unknown .npy version
        return f"unreadable .npy header ({type(e).__name__})"
    if found != tuple(shape) or dtype != np.float32 or fortran:
        return f"it holds {dtype} {found}, not float32 {tuple(shape)}"
    expected = offset + math.prod(shape) * 4
    return None if size == expected else f"{size:,} bytes instead of {expected:,}"


def write_shard(path, moments):
    """Save a shard through a temp file and a rename: a killed run leaves finished shards whole, at most a temp file."""

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temp name
            np.save(f, moments)

    try:
        dtr.atomic_write(path, save)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise dtr.InputError(
                f"no space left on the device while writing {path} (the finished shards are kept): free some, or "
                f"pass --latents a folder on a larger disk; re-running continues where it stopped"
            )
        raise dtr.InputError(f"cannot write {path} ({e.strerror or e})")


@torch.no_grad()
def encode_moments(vae, x, flips):
    """uint8 images (N, 3, S, S) -> posterior mean and std (N, F, 2, C, h, w), of each image (and of its flip)."""
    x = x.float() / 127.5 - 1  # as the training loop scales, then flips, them
    post = vae.encode(torch.cat([x, x.flip(3)]) if flips else x).latent_dist
    moments = torch.stack([post.mean, post.std], 1)  # (F * N, 2, C, h, w)
    return moments.unflatten(0, (1 + flips, len(x))).transpose(0, 1).float().cpu()


def build_latents(args, run, dataset, vae, record, missing):
    """Encode the shards in `missing` (each rank its share) and write cache.json last, when every shard is whole.

    Each rank encodes its shards in fp32, ENCODE_BATCH images and their flips per encoder call, and writes each through
    a temp file and a rename, so a killed run (even kill -9) leaves whole shards and at most a temp file; a re-run
    deletes temp files and encodes only the missing shards. Free disk space is checked first against what is left to
    write; ENOSPC while writing removes the partial file and keeps the finished shards."""
    from tqdm.auto import tqdm

    directory, size, shape = args.latents, record["shard_size"], record["shape"]
    bounds = {k: range(k * size, min((k + 1) * size, len(dataset))) for k in range(record["num_shards"])}
    if run.rank == 0:
        os.makedirs(directory, exist_ok=True)
        for tmp in glob.glob(os.path.join(directory, ".shard_*.tmp*")):  # left by a killed run (kill -9 skips clean-up)
            os.remove(tmp)
        partial = os.path.join(directory, "cache.partial.json")  # the record, until every shard is there
        if not os.path.exists(partial):
            dtr.atomic_write(partial, lambda tmp: dtr.write_text(tmp, json.dumps(record, indent=2)))
        need = sum(len(bounds[k]) for k in missing) * math.prod(shape) * 4
        free = shutil.disk_usage(directory).free
        if need > free:
            raise dtr.InputError(
                f"--latents {directory} needs {need / 1e9:.2f} GB more but its disk has {free / 1e9:.2f} GB free: "
                f"free some, or pass a folder on a larger disk"
            )
    if run.world > 1:
        dist.barrier()
    mine = missing[run.rank :: run.world]
    batches = [list(bounds[k][i : i + ENCODE_BATCH]) for k in mine for i in range(0, len(bounds[k]), ENCODE_BATCH)]
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers))
    bar = tqdm(
        total=sum(len(bounds[k]) for k in mine),
        disable=run.rank != 0,
        dynamic_ncols=True,
        unit="img",
        desc=f"encoding {len(mine)} of the {len(missing)} missing shard(s) into {directory}",
    )
    try:
        for k in mine:
            parts = []
            for _ in range(math.ceil(len(bounds[k]) / ENCODE_BATCH)):
                x, _ = next_batch(loader)  # unreadable images, also from loader workers: one line
                parts.append(encode_moments(vae, x.to(run.device), record["flips"]))
                bar.update(len(x))
            write_shard(latent_shard_file(directory, k), torch.cat(parts).numpy())
    finally:
        bar.close()
    if run.world > 1:
        dist.barrier()
    if run.rank == 0:
        for k, images in bounds.items():
            problem = shard_problem(latent_shard_file(directory, k), (len(images), *shape))
            if problem:
                raise dtr.InputError(
                    f"--latents {directory}: {latent_shard_file(directory, k)} is missing or bad after encoding "
                    f"({problem})"
                )
        done = os.path.join(directory, "cache.json")  # last: its presence says the cache is complete
        dtr.atomic_write(done, lambda tmp: dtr.write_text(tmp, json.dumps(record, indent=2)))
        os.remove(partial)
    if run.world > 1:
        dist.barrier()


def read_record(path):
    """A cache's record (cache.json), with a one-line error for a damaged one."""
    try:
        with open(path) as f:
            record = json.load(f)
        problem = None if isinstance(record, dict) and "format" in record else "not a cache record"
    except (OSError, ValueError) as e:
        problem = type(e).__name__
    if problem:
        raise dtr.InputError(
            f"cannot read {path} ({problem}): pass a new --latents DIR (or delete its folder) to encode anew"
        )
    return record


def prepare_latents(args, run, dataset, vae):
    """The cache in --latents as a LatentData: checked against this run, and first built or completed if need be.

    Refused with one line, the cache left as it was: a cache (complete or partial) made by another VAE (weights
    digest), for another image size or preprocessing, or without flips when --flip-prob > 0; a source with another
    image count or other file names (an array: its shape and three of its images); shards without cache.json; a
    damaged cache.json; a truncated or corrupt shard (every start checks each shard's .npy header and file size, not
    its data). Training from the cache reads no image and runs no encoder: the data set is only listed, for its count,
    names and labels, and the VAE serves its digest and the sample grid."""
    if os.path.exists(args.latents) and not os.path.isdir(args.latents):
        raise dtr.InputError(f"--latents {args.latents} is a file; it needs a folder (new, or one it wrote before)")
    want = cache_record(args, dataset, vae)
    records = [os.path.join(args.latents, name) for name in ("cache.json", "cache.partial.json")]
    found = next((read_record(p) for p in records if os.path.exists(p)), None)
    if found is not None:
        check_record(found, want, args)
    elif glob.glob(os.path.join(args.latents, "shard_*.npy")):  # a build writes its record before any shard
        raise dtr.InputError(
            f"--latents {args.latents} holds shards but no cache.json: nothing says how they were made; pass a new "
            f"--latents DIR (or delete that folder) to encode anew"
        )
    record = found or want  # an existing cache keeps its layout (e.g. its flips when this run does not flip)
    size, shape = record["shard_size"], record["shape"]
    counts = [min(size, len(dataset) - k * size) for k in range(record["num_shards"])]
    present = [k for k in range(len(counts)) if os.path.exists(latent_shard_file(args.latents, k))]
    bad = [(k, why) for k in present if (why := shard_problem(latent_shard_file(args.latents, k), (counts[k], *shape)))]
    if bad:
        k, why = bad[0]
        raise dtr.InputError(
            f"{latent_shard_file(args.latents, k)} is truncated or corrupt ({why}; {len(bad)} bad shard(s) in all): "
            f"delete the bad shards and re-run with the same flags to encode them again"
        )
    missing = sorted(set(range(len(counts))) - set(present))
    if missing or not os.path.exists(records[0]):
        build_latents(args, run, dataset, vae, record, missing)
    return LatentData(args.latents, size, len(dataset), dataset_labels(dataset))


class LatentData(torch.utils.data.Dataset):
    """(moments (F, 2, C, h, w) float32, label) of image i, read from the cache's memory-mapped shards."""

    def __init__(self, directory, shard_size, count, labels):
        self.directory, self.shard_size, self.count, self.labels = directory, shard_size, count, labels
        self.maps = OrderedDict()  # shard index -> memory map, least recently used first

    def __len__(self):
        return self.count

    def __getstate__(self):  # loader workers open their own maps (a pickled memmap would copy its data)
        return {**self.__dict__, "maps": OrderedDict()}

    def shard(self, k):
        if k not in self.maps:
            if len(self.maps) >= OPEN_SHARDS:
                self.maps.popitem(last=False)
            self.maps[k] = np.load(latent_shard_file(self.directory, k), mmap_mode="r")
        self.maps.move_to_end(k)
        return self.maps[k]

    def __getitem__(self, i):
        k, j = divmod(i, self.shard_size)
        return torch.from_numpy(np.array(self.shard(k)[j])), int(self.labels[i])


def cached_latents(moments, draws):
    """Latents (N, C, h, w) from cached moments (N, F, 2, C, h, w), as the loop encodes on the fly: the flipped
    entry for a flipped image, z = (mean + std * eps) * 0.18215 with this step's posterior draw eps.

    So training from the cache gives the weights of encoding on the fly (bit for bit on the CPU, where the encoder
    gives an image the same float32 result in any batch of two or more)."""
    m = torch.where(draws["flip"][:, None, None, None, None], moments[:, -1], moments[:, 0])  # (N, 2, C, h, w)
    return (m[:, 0] + m[:, 1] * draws["posterior"]) * dtr.VAE_SCALE


#################################################################################
#               Checkpoints and experiments: resume, save, folders              #
#################################################################################


def resume_checkpoint(args):
    """(checkpoint, lines to log) for --resume, or (None, []): refuses changes to what must stay fixed and to the data.

    A checkpoint that records no data source (args["data_source"]) resumes with the data unchecked, and says so."""
    if not args.resume:
        return None, []
    path = latest_checkpoint(args.results_dir, args) if args.resume == "auto" else args.resume
    if path is None:  # auto, and no experiment of this model yet: start one
        return None, []
    ckpt, args.resume = dtr.read_checkpoint(path), path
    trained = dtr.checkpoint_model_args(ckpt) if isinstance(ckpt, dict) else None
    if trained is None:
        raise dtr.InputError(f"--resume {path} is not a train.py checkpoint (to start from its weights: --init-from)")
    before = {**ckpt["args"], **trained}
    for k in dtr.MODEL_ARGS + RESUME_FIXED:
        if before.get(k) != getattr(args, k):
            raise dtr.InputError(f"--resume {path}: {k} is {before.get(k)!r} there but {getattr(args, k)!r} now")
    notes = []
    old, new = before.get("data_source"), args.data_source
    if old is None:
        notes.append(f"{path} records no data source: the data is not checked against it")
    elif (old["count"], old["digest"]) != (new["count"], new["digest"]):
        raise dtr.InputError(
            f"--resume {path}: it trained on {before.get('data') or 'the built-in shapes'} ({old['count']:,} images, "
            f"digest {old['digest']}) but the data is now {args.data or 'the built-in shapes'} ({new['count']:,} "
            f"images, digest {new['digest']}): resume with the same images (a new run: leave out --resume)"
        )
    changed = [
        f"--{k.replace('_', '-')} {v} (was {before.get(k)})"
        for k, v in vars(args).items()
        if k not in ("resume", "data_source") and before.get(k) != v
    ]  # applied: logged once the log exists
    return ckpt, notes + ([f"changed on resume: {', '.join(changed)}"] if changed else [])


def resumed_experiment(path, step):
    """The experiment a resume from checkpoint `path` (at `step`) continues, or None: it starts a new one under
    --results-dir.

    A resume continues <exp> only from its newest checkpoint: `path` lies in <exp>/checkpoints/, <exp> has an
    args.json (a train.py experiment) and no checkpoint there is of a later step. Any other checkpoint (an older one,
    a copy elsewhere) starts a new experiment whose args.json records resumed_from: no checkpoint is overwritten and
    no log.txt holds two runs."""
    folder = os.path.dirname(os.path.abspath(path))
    exp = os.path.dirname(folder)
    if os.path.basename(folder) != "checkpoints" or read_args(exp) is None:
        return None
    later = [p for p in glob.glob(os.path.join(folder, "*.pt")) if leading_number(p) > step]
    return None if later else exp


def restore(state, ckpt, args, run):
    """Continue from a checkpoint: weights, EMA, optimizer (with this run's lr / weight decay), scaler, RNG, step."""
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["opt"])
    state.opt.param_groups[0].update(lr=args.lr, weight_decay=args.weight_decay)  # this run's flags, not the saved
    if state.uw is not None:
        state.opt.param_groups[1]["lr"] = args.uw_lr
        state.uw.data.copy_(ckpt["uw"])
    if state.scaler.is_enabled() and ckpt.get("scaler"):  # fp16: the loss scale and its growth count
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = ckpt["step"]
    if len(ckpt["rng"]) == run.world:
        torch.set_rng_state(ckpt["rng"][run.rank]["cpu"])
        if run.device.type == "cuda" and ckpt["rng"][run.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][run.rank]["cuda"], run.device)


def clean_state_dict(sd):
    """A model state dict, unwrapped and without the official DTR repo's mask buffers.

    The masks are dropped unchecked: --init-from takes weights only, and routing comes from this run's flags (one may
    fine-tune a plain DiT with DTR, or change alpha); sample.py, which must reproduce a model, checks them instead."""
    return {k: v for k, v in dtr.unwrap_state_dict(sd).items() if not k.endswith(dtr.MASK_KEY)}


def open_experiment(args, run, data, state, resumed, notes=()):
    """The experiment folder (new, or the one a resume continues: see resumed_experiment) and its logger; logs what
    this run is."""
    exp = resumed_experiment(args.resume, state.step) if resumed else None
    continued = exp is not None
    if not continued and run.rank == 0:
        exp = new_experiment_dir(args)
        record = {**vars(args), **({"resumed_from": os.path.abspath(args.resume)} if resumed else {})}
        dtr.atomic_write(os.path.join(exp, "args.json"), lambda tmp: dtr.write_text(tmp, json.dumps(record, indent=2)))
    log = Logger(exp if run.rank == 0 else None)
    condition = f"{args.num_classes} classes"
    if data.text is not None:
        condition = (
            f"{sum(map(len, data.captions)):,} captions, text encoder {args.text_encoder} "
            f"({data.text.length} x {data.text.dim})"
        )
    what = f"experiment {exp}"
    if resumed:
        what = f"resuming {args.resume} at step {state.step}" + (
            "" if continued else f" in a new experiment {exp} (only an experiment's newest checkpoint continues it)"
        )
    log(
        f"{what}: {args.model}, "
        f"routing {args.routing} (alpha {args.alpha}, beta {args.beta}), {len(data.dataset):,} images, {condition}, "
        f"{sum(p.numel() for p in state.model.parameters()):,} parameters, "
        f"{run.world} process(es) x batch {args.global_batch_size // run.world} on {run.device}"
    )
    for line in notes:
        log(line)
    return exp, log


def rng_states(world, device):
    """Every rank's global RNG states (they drive dropout), gathered for the checkpoint."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(args, run, exp, state):
    """Everything needed to resume bit-exactly, written atomically by rank 0 (all ranks join the RNG gather).

    checkpoints/NNNNNNN.pt = {model, ema, opt, model_args, args, step, uw, rng, scaler}: model_args are dtr.MODEL_ARGS,
    all sample.py needs to rebuild the network and its diffusion; uw: ANT-UW's log-variances; rng: every rank's RNG
    states; scaler: the fp16 GradScaler's state. model and ema are plain state dicts (no module. or _orig_mod.
    prefixes) that load strictly into facebookresearch/DiT's DiT built with the same arguments (unconditional:
    num_classes=1, class_dropout_prob=0) or guided-diffusion's UNetModel (with label dropout: num_classes + 1)."""
    rng = rng_states(run.world, run.device)
    if run.rank:
        return None
    path = os.path.join(exp, "checkpoints", f"{state.step:07d}.pt")
    ckpt = {
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "opt": state.opt.state_dict(),
        "model_args": dtr.model_args(args),
        "args": vars(args),
        "step": state.step,
        "uw": None if state.uw is None else state.uw.detach().cpu(),
        "rng": rng,
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
    }  # fp16 only
    dtr.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return path


def latest_checkpoint(results_dir, args=None):
    """The newest checkpoint of the newest experiment under results_dir (None if there is none); with `args`, of the
    newest experiment whose args.json has their model arguments, never another model's or routing's. Newest: the
    largest leading number (NNN-..., NNNNNNN.pt)."""
    keys = () if args is None else dtr.MODEL_ARGS
    for exp in sorted(glob.glob(os.path.join(results_dir, "*")), key=leading_number, reverse=True):
        found = sorted(glob.glob(os.path.join(exp, "checkpoints", "*.pt")), key=leading_number)
        saved = read_args(exp) if keys else {}
        if found and saved is not None and all(saved.get(k) == getattr(args, k) for k in keys):
            return found[-1]
    return None


def leading_number(path):
    """The number a file or folder name starts with (NNN-model-routing, NNNNNNN.pt), or -1 if it starts otherwise."""
    digits = re.match(r"\d+", os.path.basename(path))
    return int(digits.group()) if digits else -1


def read_args(exp):
    """The args.json of an experiment directory, or None if it has none (or an unreadable one)."""
    try:
        with open(os.path.join(exp, "args.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def new_experiment_dir(args):
    """results/NNN-model-routing, NNN one above the largest number there, never reusing an existing directory."""
    os.makedirs(args.results_dir, exist_ok=True)
    index = 1 + max(map(leading_number, glob.glob(os.path.join(args.results_dir, "*"))), default=-1)
    while True:
        path = os.path.join(args.results_dir, f"{index:03d}-{args.model.replace('/', '-')}-{args.routing}")
        try:
            os.makedirs(os.path.join(path, "checkpoints"))
            return path
        except FileExistsError:
            index += 1


#################################################################################
#                       Logging, progress and sample grids                      #
#################################################################################


class Logger:
    """Prints on rank 0 and appends to DIR/log.txt; silent on other ranks."""

    def __init__(self, exp):
        self.path = os.path.join(exp, "log.txt") if exp else None

    def __call__(self, msg):
        if self.path:
            from tqdm.auto import tqdm

            tqdm.write(msg)
            with open(self.path, "a") as f:
                f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")


class MetricsLog:
    """DIR/metrics.jsonl, the machine-readable log: one JSON object a line, in step order, written by rank 0.

    Every --log-every steps (and at the last) Meter appends {"kind": "train", "step", "loss": the mean over the
    interval and all ranks, "loss_quarters": [4 means by timestep quarter t * 4 // T, null where no sample fell],
    "uw_weights": [ANT-UW's 0.5 exp(-s_k) per cluster] or null, "lr", "grad_norm": the mean of the steps' gradient
    norms (null if fp16 skipped every step since the last record), "images_per_s", "peak_memory_bytes": the largest over ranks,
    "peak_memory": what that measures (PEAK_MEMORY)}; after every evaluation (--eval-every) {"kind": "eval", "step",
    "metrics": {fid.py's result names: values}, "num_samples", "sampler", "sampling_steps", "cfg_scale", "seed",
    "reference", "metrics_asked" (eval_settings: a resume refuses others), "seconds"}.
    A record is appended with one os.write of the whole line on an O_APPEND descriptor, then fsync'ed: a killed run
    leaves whole lines (a torn last line, if the machine stops mid-write, is ignored by dtr.read_metrics). A run that
    resumes at step S first rewrites the file atomically with only the records of steps <= S: the records an
    interrupted run wrote after its checkpoint are dropped, so the file is one timeline."""

    def __init__(self, exp, step):
        self.path = os.path.join(exp, "metrics.jsonl") if exp else None  # None: not rank 0, nothing written
        if self.path and os.path.exists(self.path):
            text = "".join(json.dumps(r) + "\n" for r in dtr.read_metrics(self.path) if r["step"] <= step)
            dtr.atomic_write(self.path, lambda tmp: dtr.write_text(tmp, text))

    def append(self, **record):
        """Append one record as one line, durably."""
        if self.path is None:
            return
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.write(fd, line) != len(line):  # a regular file takes all of it unless the disk is full
                raise OSError(errno.ENOSPC, f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)


class Meter:
    """The progress bar, the non-finite-loss guard, and every --log-every steps: speed, the loss averaged over
    ranks, the loss per timestep quarter, the mean gradient norm and the ANT-UW weights, in log.txt and
    metrics.jsonl (MetricsLog)."""

    def __init__(self, args, run, log, exp, step):
        from tqdm.auto import tqdm

        self.args, self.run, self.log, self.exp = args, run, log, exp
        self.records = MetricsLog(exp if run.rank == 0 else None, step)
        self.bar = tqdm(initial=step, total=args.steps, disable=run.rank != 0, dynamic_ncols=True, desc="train")
        self.stats = torch.zeros(2, 4, device=run.device)  # loss sum and sample count per timestep quarter
        self.grad_norms = torch.zeros(2, device=run.device)  # sum and count of finite ones (the same on every rank)
        self.start, self.start_step = time.perf_counter(), step

    def update(self, step, t, losses, loss, uw, grad_norm):
        """Account for a finished step; stop on a non-finite loss."""
        finite = torch.isfinite(grad_norm)  # fp16 skips a step whose gradient overflowed: not averaged in
        self.grad_norms += torch.stack([torch.where(finite, grad_norm, 0), finite]).float()
        quarter = (t * 4 // self.args.num_timesteps).clamp(max=3)
        self.stats[0].index_add_(0, quarter, losses)
        self.stats[1].index_add_(0, quarter, torch.ones_like(losses))
        check = all_reduce_mean(loss.reshape(1).clone(), self.run.world).item()
        if not math.isfinite(check):
            raise dtr.SharedError(  # every rank sees the same mean
                f"loss is {check} at step {step}; stopped, the last checkpoint in {self.exp} is the last good one"
            )
        self.bar.set_postfix(loss=f"{check:.4f}")
        self.bar.update()
        if step % self.args.log_every == 0 or step == self.args.steps:
            self.log(self.summary(step, uw))

    def summary(self, step, uw):
        """The log line since the last one, also appended to metrics.jsonl; resets the sums."""
        totals = all_reduce_mean(self.stats.clone(), self.run.world)
        per_quarter = (totals[0] / totals[1].clamp(min=1)).tolist()
        mean = (totals[0].sum() / totals[1].sum().clamp(min=1)).item()
        speed = (step - self.start_step) / (time.perf_counter() - self.start)
        norms, finite = self.grad_norms.tolist()
        grad_norm = norms / finite if finite else None  # None: every step since the last record was skipped (fp16)
        msg = (
            f"step {step:07d}  loss {mean:.4f}  [t quarters {' '.join(f'{q:.4f}' for q in per_quarter)}]  "
            f"{speed:.2f} steps/s  {speed * self.args.global_batch_size:.1f} img/s  "
            f"grad norm {'n/a' if grad_norm is None else f'{grad_norm:.4f}'}"
        )
        peak = self.peak_memory()  # a collective: every rank, before rank 0 alone writes
        weights = None if uw is None else (0.5 * torch.exp(-uw.detach())).tolist()
        if weights is not None:  # the weight each cluster's loss gets: 0.5 exp(-s_k)
            msg += "  uw " + " ".join(f"{w:.3f}" for w in weights)
        self.records.append(
            kind="train",
            step=step,
            loss=mean,
            loss_quarters=[q if n > 0 else None for q, n in zip(per_quarter, totals[1].tolist())],
            uw_weights=weights,
            lr=self.args.lr,  # constant: no schedule, as in the paper
            grad_norm=grad_norm,
            images_per_s=speed * self.args.global_batch_size,
            peak_memory_bytes=peak,
            peak_memory=PEAK_MEMORY[self.run.device.type],
        )
        self.stats.zero_()
        self.grad_norms.zero_()
        self.start, self.start_step = time.perf_counter(), step
        return msg

    def peak_memory(self):
        """The largest peak over ranks (dtr.peak_memory); on CUDA the peak then starts anew."""
        peak = torch.tensor([float(dtr.peak_memory(self.run.device))], dtype=torch.float64, device=self.run.device)
        if self.run.world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if self.run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.run.device)
        return int(peak.item())

    def evaluated(self, step, results, seconds, settings):
        """Log an evaluation's results (rank 0: log.txt and metrics.jsonl); its time is left out of the next speed."""
        self.start += seconds
        if self.run.device.type == "cuda":  # the next train record's peak is training's, not sampling's
            torch.cuda.reset_peak_memory_stats(self.run.device)
        if self.run.rank:
            return
        a = self.args
        self.log(
            f"step {step:07d}  eval  {'  '.join(f'{k} {v:.4f}' for k, v in results.items())}  ({a.eval_samples} "
            f"samples, {a.eval_sampler} {a.eval_steps} steps, cfg {a.eval_cfg_scale}, {seconds:.1f} s)"
        )
        self.records.append(kind="eval", step=step, metrics=results, **settings, seconds=seconds)

    def close(self):
        self.bar.close()


def save_training_grid(args, exp, step, ema, vae, device, data=None):
    """A grid of EMA samples next to the checkpoints: a row per class (up to 8), or per prompt (text; listed in .txt).

    Each sample is upscaled by an integer factor (nearest neighbour) so the 8 columns are at least GRID_MIN_WIDTH
    pixels wide; tiles are separated by 1-pixel black lines."""
    from torchvision.utils import save_image

    path = os.path.join(exp, f"samples_{step:07d}.png")
    rows = min(args.num_classes, 8) if args.num_classes > 1 else 8
    labels = None if args.num_classes == 1 else torch.arange(rows).repeat_interleave(8).tolist()
    mask = None
    if data is not None and data.text is not None:  # the first caption of the first images with distinct first
        prompts = list(dict.fromkeys(c[0] for c in data.captions))[:8]  # captions (demo: one per shape)
        rows, (labels, mask) = len(prompts), data.text([p for p in prompts for _ in range(8)])
        mask = mask if args.text_mask else None
        dtr.atomic_write(path[:-4] + ".txt", lambda tmp: dtr.write_text(tmp, "\n".join(prompts) + "\n"))
    ema.eval()
    diffusion = dtr.build_diffusion(dtr.model_args(args), str(args.grid_steps))
    cfg_scale = args.grid_cfg_scale if args.class_dropout_prob > 0 else 1.0
    images = dtr.generate(
        ema, diffusion, labels, range(rows * 8), cfg_scale=cfg_scale, vae=vae, device=device, context_mask=mask
    )
    factor = max(1, math.ceil(GRID_MIN_WIDTH / (8 * images.shape[2])))
    images = images.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)  # (N, H f, W f, 3)
    grid = images.permute(0, 3, 1, 2).float() / 255
    dtr.atomic_write(path, lambda tmp: save_image(grid, tmp, nrow=8, padding=1, format="png"))
    return path


#################################################################################
#                    FID during training: --eval-every, --eval                  #
#################################################################################


@dataclass
class Evaluation:
    """What every evaluation reuses: the metrics, their feature networks, REF's statistics (rank 0), the samples'
    labels (None: unconditional), and the steps already scored."""

    metrics: tuple
    networks: list
    reference: dict
    labels: np.ndarray
    done: set = field(default_factory=set)


def check_eval_flags(args, metrics):
    """Refuse --eval-* settings that could not be scored, one line each (the model's classes are known by now)."""
    if args.eval_every < 0:
        raise dtr.InputError(f"--eval-every must be >= 0 (0: no evaluation), got {args.eval_every}")
    if args.eval is None:
        raise dtr.InputError(
            "--eval-every needs --eval REF (an ADM .npz batch, an image folder or a fid.py --save-stats file)"
        )
    if not args.eval_every:
        raise dtr.InputError("--eval REF scores the model during training: it needs --eval-every STEPS")
    if args.context_dim is not None:
        raise dtr.InputError(
            "--eval-every scores class-conditional and unconditional models; for text-to-image, sample a checkpoint "
            "with sample.py --captions ... --eval REF"
        )
    least = PR_NEIGHBOURS + 1 if "pr" in metrics else 2  # a covariance needs 2 samples
    if args.eval_samples < least:
        raise dtr.InputError(f"--eval-samples must be at least {least} for --metrics {','.join(metrics)}")
    if not 1 <= args.eval_steps <= args.num_timesteps:
        raise dtr.InputError(
            f"--eval-steps {args.eval_steps} must be between 1 and --num-timesteps {args.num_timesteps}"
        )
    if args.eval_cfg_scale is None:
        args.eval_cfg_scale = EVAL_CFG_SCALE if args.class_dropout_prob > 0 else 1.0
    if args.eval_cfg_scale < 0:
        raise dtr.InputError(f"--eval-cfg-scale must be >= 0 (1: no guidance), got {args.eval_cfg_scale}")
    if args.eval_cfg_scale != 1 and not args.class_dropout_prob > 0:
        raise dtr.InputError(
            f"--eval-cfg-scale {args.eval_cfg_scale} needs guidance, but the model has no null class "
            f"(unconditional, or --class-dropout-prob 0); use --eval-cfg-scale 1"
        )


def eval_metrics(args):
    """--eval-every's metrics, its flags checked (None without it)."""
    if not args.eval_every and args.eval is None:
        return None
    metrics = fid.parse_metrics(args.metrics)
    check_eval_flags(args, metrics)
    return metrics


def setup_eval(args, run, metrics):
    """--eval-every: load the feature networks and extract REF's features, once (over all ranks); None without it.
    Runs before anything is written, so that a bad REF or missing network weights stop training at once with one
    line (fid.py's loaders stop every rank)."""
    if metrics is None:
        return None
    names = list(dict.fromkeys(fid.METRICS[m] for m in metrics))  # the networks these metrics read
    reference = fid.open_source(args.eval, names)
    with torch.random.fork_rng(devices=[]):  # building them draws initial weights: leave training's stream alone
        networks = fid.load_networks(
            names, run.device, args.inception_weights, args.dinov2_weights, run.rank, run.world
        )
    feats = fid.source_features(reference, networks, eval_batch_size(args, run), progress=run.rank == 0)
    with dtr.shared_errors():  # every rank has REF's features: the same check everywhere
        if "pr" in metrics and fid.num_images(feats) <= PR_NEIGHBOURS:
            raise dtr.InputError(f"--eval {args.eval}: precision and recall need more than {PR_NEIGHBOURS} images")
    labels = dtr.make_labels(args.num_classes, args.eval_samples, args.seed) if args.num_classes > 1 else None
    stats = fid.statistics(feats, reference[1]) if run.rank == 0 else None
    return Evaluation(metrics, networks, stats, labels)


def scored_steps(exp, settings, step):
    """The steps up to `step` (where a run resumes; MetricsLog drops later records) that exp/metrics.jsonl holds an
    evaluation of (rank 0); refuses evaluations made with other `settings` (eval_settings), whose scores one curve
    could not hold."""
    path = os.path.join(exp, "metrics.jsonl")
    if not os.path.exists(path):
        return set()
    scored = [r for r in dtr.read_metrics(path) if r.get("kind") == "eval" and r["step"] <= step]
    for r in scored:
        other = {k: r.get(k) for k in settings if r.get(k) != settings[k]}
        if other:
            raise dtr.InputError(
                f"{path} holds scores made with {other}, not { ({k: settings[k] for k in other}) }: keep the "
                "--eval-* settings and --metrics of this experiment, or resume into a new one"
            )
    return {r["step"] for r in scored}


def eval_settings(args, metrics):
    """What an evaluation's scores depend on besides the model: metrics.jsonl records them with the scores."""
    return dict(
        num_samples=args.eval_samples,
        sampler=args.eval_sampler,
        sampling_steps=args.eval_steps,
        cfg_scale=args.eval_cfg_scale,
        seed=args.seed,
        reference=os.path.abspath(args.eval),
        metrics_asked=list(metrics),
    )


def eval_batch_size(args, run):
    """Images a rank samples (and extracts features of) at once: its share of the global batch."""
    return args.global_batch_size // run.world


class EvalSamples:
    """The evaluation samples as a lazy uint8 image array (K, H, W, 3) for fid.compute_features: a slice is generated
    when read, sample i from seed --seed + i with label i of dtr.make_labels, as `sample.py --seed` makes it."""

    def __init__(self, model, diffusion, labels, seed, count, **generate):
        self.model, self.diffusion, self.labels, self.seed, self.count = model, diffusion, labels, seed, count
        self.generate = generate  # dtr.generate's keywords: cfg_scale, vae, device, sampler

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        i = np.arange(self.count)[index]
        y = None if self.labels is None else self.labels[i]
        return dtr.generate(self.model, self.diffusion, y, self.seed + i, **self.generate).numpy()


def evaluate(args, run, evaluation, ema, vae):
    """The metrics of --eval-samples samples of the EMA model against REF, on rank 0 (None elsewhere). Every rank
    samples and extracts the features of a contiguous share (fid.compute_features), and the training RNG is left as
    it was: the scores are the same for any world size, and training continues as without them."""
    ema.eval()
    diffusion = dtr.build_diffusion(dtr.model_args(args), str(args.eval_steps))
    images = EvalSamples(
        ema,
        diffusion,
        evaluation.labels,
        args.seed,
        args.eval_samples,
        cfg_scale=args.eval_cfg_scale,
        vae=vae,
        device=run.device,
        sampler=args.eval_sampler,
    )
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), torch_default_tf32():
        feats = fid.compute_features(  # sampled on this thread, under sample.py's (torch's default) TF32 settings
            images, evaluation.networks, eval_batch_size(args, run), progress=run.rank == 0, read_ahead=False
        )
    if run.rank:
        return None
    return fid.evaluate(evaluation.reference, fid.statistics(feats), metrics=evaluation.metrics)


@contextlib.contextmanager
def torch_default_tf32():
    """torch's default TF32 settings (TF32 convolutions, full-precision matmuls), as sample.py samples with; training's
    (TF32 everywhere on CUDA) are restored after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32, cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def evaluate_if_due(args, run, evaluation, state, vae, meter):
    """Score the EMA model if this step is an --eval-every multiple (or the last) and metrics.jsonl has no score of it
    yet; rank 0 logs the results."""
    step = state.step
    due = evaluation is not None and step > 0 and (step % args.eval_every == 0 or step == args.steps)
    if not due or step in evaluation.done:
        return
    start = time.perf_counter()
    results = evaluate(args, run, evaluation, state.ema, vae)
    meter.evaluated(step, results, time.perf_counter() - start, eval_settings(args, evaluation.metrics))
    evaluation.done.add(step)


#################################################################################
#                                  Command line                                 #
#################################################################################


def resolve_preset(args):
    """Fill flags left unset from the demo preset (no --data) or the paper's settings (with --data); text encoder."""
    if args.text_demo and (args.data is not None or args.captions is not None):
        raise dtr.InputError("--text-demo trains on the built-in shapes; leave out --data and --captions")
    if args.text_demo or args.captions is not None:
        args.text_encoder = args.text_encoder or (dtr.DEMO_TEXT_ENCODER if args.text_demo else dtr.COCO_TEXT_ENCODER)
    elif args.text_encoder or args.cache_text or args.text_mask:
        raise dtr.InputError(
            "--text-encoder, --cache-text and --text-mask apply to text-to-image runs (--captions or --text-demo)"
        )
    preset = DEMO if args.data is None else PAPER
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.vae is None and args.data is not None and args.model in dtr.DiT_models and args.image_size > PIXEL_DIT_MAX:
        args.vae = "ema"  # the paper's DiTs learn Stable Diffusion's latents (256 px: 32x32x4); ADMs learn pixels
    args.vae = None if args.vae == "none" else args.vae
    if args.latents and not args.vae:
        raise dtr.InputError(
            "--latents stores VAE latents: it needs --vae ema|mse (a pixel-space run reads its images directly)"
        )
    check_args(args)
    return args


def check_args(args):
    """Stop with one line at the first size, interval or rate out of its range, before anything is read or written."""
    at_least = dict(
        steps=1,
        global_batch_size=1,
        image_size=1,
        demo_images_per_class=1,
        num_timesteps=1,
        log_every=1,
        ckpt_every=1,
        sample_every=0,  # 0: a grid only at the end
        latent_shard_size=1,
        num_workers=0,
        lr=0,
        weight_decay=0,
        uw_lr=0,
        grad_accum=1,
    )
    for k, low in at_least.items():
        if not getattr(args, k) >= low:  # also catches NaN
            raise dtr.InputError(f"--{k.replace('_', '-')} is {getattr(args, k)}; it must be at least {low}")
    for k in ("ema_decay", "flip_prob"):
        if not 0 <= getattr(args, k) <= 1:
            raise dtr.InputError(f"--{k.replace('_', '-')} is {getattr(args, k)}; it must be between 0 and 1")
    if not 0 <= args.class_dropout_prob < 1:  # 1 would drop every label: the conditional model never trains
        raise dtr.InputError(f"--class-dropout-prob is {args.class_dropout_prob}; it must be in [0, 1)")
    if args.loss_weight == "ant-uw" and not 1 <= args.uw_clusters <= args.num_timesteps:
        raise dtr.InputError(
            f"--uw-clusters {args.uw_clusters} must be between 1 and --num-timesteps {args.num_timesteps}"
        )
    if not 1 <= args.grid_steps <= args.num_timesteps:  # the sample grid respaces the T training steps
        raise dtr.InputError(
            f"--grid-steps {args.grid_steps} must be between 1 and --num-timesteps {args.num_timesteps}"
        )
    if args.vae and args.image_size % dtr.VAE_FACTOR:
        raise dtr.InputError(f"--image-size {args.image_size} is not divisible by the VAE factor {dtr.VAE_FACTOR}")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise dtr.InputError(f"--max-grad-norm {args.max_grad_norm} must be positive")


def main(args):
    """Train as the command line says; bad input stops with one line and exit status 1 (dtr.one_line_errors)."""
    with dtr.one_line_errors("train.py"):
        return train(resolve_preset(args))


def parser():
    """The command line; every flag the demo or the paper presets leave unset defaults to None."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument(
        "--data",
        default=None,
        help="image folder (ImageFolder), ADM .npz (uncompressed; memory-mapped) or "
        ".npy of images; default: built-in coloured shapes",
    )
    p.add_argument("--image-size", type=int, default=None, help="pixels (demo 16, paper 256)")
    p.add_argument("--unconditional", action="store_true", help="ignore class labels")
    p.add_argument("--flip-prob", type=float, default=0.5, help="random horizontal flips")
    p.add_argument("--demo-images-per-class", type=int, default=500)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument(
        "--vae",
        choices=["ema", "mse", "none"],
        default=None,
        help="train in Stable Diffusion's latent space (needs diffusers), or none: pixels. Default with "
        f"--data: ema for a DiT above {PIXEL_DIT_MAX} px (the paper's setting), else none (ADMs, small "
        "images, the demo)",
    )
    p.add_argument(
        "--vae-path", default=None, help="local AutoencoderKL directory (default: the hub's stabilityai/sd-vae-ft-*)"
    )
    p.add_argument(
        "--latents",
        default=None,
        metavar="DIR",
        help="pre-encoded latents: the VAE posterior's mean and std of every image and of its flip, float32, "
        "in DIR; built first if missing or incomplete (sharded over ranks, resumable), then training "
        "reads no image and runs no encoder. Needs --vae; refused if DIR was made with another VAE, "
        "image size, flips or source",
    )
    p.add_argument(
        "--latent-shard-size", type=int, default=1024, help="images per --latents shard file (64 MiB at 256 px)"
    )
    # text-to-image (needs transformers)
    p.add_argument(
        "--captions", default=None, help="COCO captions_*.json for the images in --data: text-to-image training"
    )
    p.add_argument(
        "--text-demo", action="store_true", help="text-to-image on the built-in shapes, captioned 'a red circle', ..."
    )
    p.add_argument(
        "--text-encoder",
        default=None,
        help=f"CLIP text encoder: local directory or hub name (default {dtr.COCO_TEXT_ENCODER}; "
        f"--text-demo: {dtr.DEMO_TEXT_ENCODER}, a tiny random one)",
    )
    p.add_argument(
        "--cache-text", default=None, metavar="DIR", help="keep every caption's embedding in DIR (encoded once)"
    )
    p.add_argument(
        "--text-mask", action="store_true", help="cross-attend only to the caption's tokens, not to CLIP's padding"
    )
    # model and routing
    p.add_argument("--model", choices=list(dtr.MODELS), default=None, help="demo DiT-T/2, paper DiT-L/2")
    p.add_argument("--routing", choices=dtr.ROUTINGS, default="dtr")
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument("--routing-seed", type=int, default=0, help="seeds the R-TR masks")
    p.add_argument(
        "--class-dropout-prob",
        type=float,
        default=0.1,
        help="label (text: caption) dropout for classifier-free guidance",
    )
    p.add_argument("--fixed-sigma", dest="learn_sigma", action="store_false", help="do not learn the variance")
    # diffusion and loss
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--noise-schedule", choices=["linear", "cosine"], default="cosine")
    p.add_argument("--loss-weight", choices=["constant", "min-snr", "p2", "ant-uw"], default="constant")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--p2-gamma", type=float, default=1.0)
    p.add_argument("--p2-k", type=float, default=1.0)
    p.add_argument(
        "--uw-clusters",
        type=int,
        default=8,
        help="ANT-UW timestep clusters K, drawn stratified: the per-rank batch must be divisible by K",
    )
    p.add_argument(
        "--uw-lr",
        type=float,
        default=0.025,
        help="learning rate of the ANT-UW log-variances (own AdamW group, no weight decay)",
    )
    # optimisation
    p.add_argument("--global-batch-size", type=int, default=None, help="demo 64, paper 256")
    p.add_argument("--lr", type=float, default=None, help="demo 2e-3, paper 1e-4")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=None, help="demo 0.995, paper 0.9999")
    p.add_argument("--steps", type=int, default=None, help="demo 2400, paper 400000")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        metavar="A",
        help="gradient accumulation: run each rank's share of the global batch as A micro-batches, one after "
        "another, summing their gradients (DDP all-reduces only after the last), for the activation memory of "
        "a batch A times smaller. The update is the global batch's for any A (draws and ANT-UW cluster means are "
        "over the whole batch): weights equal to A=1's up to the order of float sums. The per-rank batch must "
        "be divisible by A",
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip the model's gradients to this total L2 norm (after fp16 unscaling) before AdamW; default: "
        "no clipping, as in the paper. The norm is logged either way",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="bf16 / fp16: autocast (fp16 with a GradScaler); fp32 uses TF32 on CUDA",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--grad-ckpt",
        action="store_true",
        help="gradient checkpointing (DiT and ADM blocks): recompute "
        "activations in backward, for less memory; the weights and state dict are unchanged, the gradients are "
        "those without it, and each block costs one more forward pass",
    )
    p.add_argument("--seed", type=int, default=0)
    # bookkeeping
    p.add_argument("--results-dir", default="results")
    p.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="a line in log.txt and a record in metrics.jsonl every N steps (see MetricsLog; a resumed run first "
        "drops the records after its step)",
    )
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument(
        "--sample-every", type=int, default=None, help="also write a sample grid every N steps (0: only at the end)"
    )
    p.add_argument("--grid-steps", type=int, default=250, help="DDPM steps for the sample grid")
    p.add_argument("--grid-cfg-scale", type=float, default=4.0, help="guidance scale for the sample grid")
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint path, or 'auto' for the newest under --results-dir. It continues its experiment only if it is "
        "that experiment's newest checkpoint; any other (older, or a copy elsewhere) starts a new experiment under "
        "--results-dir (args.json: resumed_from), so no checkpoint is overwritten. Refused if the model, the data, "
        "or a flag fixing the data order, draws or loss changed",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="load model weights only (e.g. a pretrained DiT / ADM checkpoint), keys matched strictly",
    )
    # FID during training (fid.py's metrics of the EMA model's samples; log.txt and metrics.jsonl)
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="score the EMA model every STEPS steps and at the last step against --eval REF (0: never). A step that "
        "metrics.jsonl already holds a score of (a resumed run) is not scored again",
    )
    p.add_argument(
        "--eval",
        default=None,
        metavar="REF",
        help="the reference for --eval-every, as fid.py's: an ADM .npz batch, an image folder or a fid.py "
        "--save-stats file; its features are computed once at start-up. Nothing is downloaded but the "
        "feature networks' weights (see --inception-weights)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=10_000,
        metavar="K",
        help="samples per evaluation: sample i from seed --seed + i with sample.py's label i for that seed, so "
        "the images (and scores) are those of sample.py --seed SEED --num-samples K, for any number of ranks",
    )
    p.add_argument("--eval-sampler", choices=["ddpm", "ddim"], default="ddpm", help="--eval-every's sampler")
    p.add_argument("--eval-steps", type=int, default=250, help="--eval-every's sampling steps (the paper's DDPM-250)")
    p.add_argument(
        "--eval-cfg-scale",
        type=float,
        default=None,
        help=f"--eval-every's guidance scale (default {EVAL_CFG_SCALE}, the paper's FID; 1 for a model without a "
        "null class)",
    )
    p.add_argument(
        "--metrics",
        default=",".join(fid.ADM_METRICS),
        help=f"--eval-every's metrics, from {','.join(fid.METRICS)} (default: ADM's evaluator's, as fid.py)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="--eval-every: a local pt_inception-2015-12-05-6726825d.pth (default: torch.hub's cache, else downloaded)",
    )
    p.add_argument(
        "--dinov2-weights", default=None, help="--eval-every with fd_dinov2: a local dinov2_vitl14_pretrain.pth"
    )
    return p


#################################################################################
#             Benchmark: pre-encoded latents vs encoding on the fly             #
#################################################################################

SD_VAE_CONFIG = dict(  # Stable Diffusion's AutoencoderKL (sd-vae-ft-ema / -mse share it): for benchmarks, offline
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
)


def bench_latents(vae_path=None, model="DiT-B/2", image_size=256, batch_size=4, rounds=5, seed=0):
    """Median seconds per training step encoding on the fly vs reading a --latents cache, interleaved; printed.

    vae_path=None builds Stable Diffusion's VAE architecture (SD_VAE_CONFIG) with random weights, offline: the encoder
    costs the same with any weights. A step is the loop's own (model_inputs, train_step): latents, loss, backward,
    AdamW, EMA. Round 0 warms up; the two paths alternate their order every round, so drift hits both alike."""
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if vae_path is None:
            from diffusers.models import AutoencoderKL

            vae_path = os.path.join(tmp, "vae")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(vae_path)
        data = os.path.join(tmp, "images.npz")
        np.savez(data, np.random.default_rng(seed).integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8))
        args = resolve_preset(
            parser().parse_args(
                [
                    "--data",
                    data,
                    "--model",
                    model,
                    "--image-size",
                    str(image_size),
                    "--vae",
                    "ema",
                    "--vae-path",
                    vae_path,
                    "--global-batch-size",
                    str(batch_size),
                    "--num-workers",
                    "0",
                    "--latents",
                    os.path.join(tmp, "latents"),
                ]
            )
        )
        run = Run(0, 1, torch.device("cpu"), slice(None))
        images = load_training_data(args, run)  # unconditional: no labels in the .npz
        vae = dtr.load_vae(args.vae, args.vae_path, run.device)
        start = time.perf_counter()
        cache = TrainingData(prepare_latents(args, run, images.dataset, vae), latents=True)
        encode_once = time.perf_counter() - start
        state, diffusion = init_state(args, run), dtr.build_diffusion(dtr.model_args(args), **loss_weighting(args))

        def step(data, i):
            start = time.perf_counter()
            draws = step_randomness(args, i, run)
            batch = torch.utils.data.default_collate([data.dataset[j] for j in range(batch_size)])
            x, kwargs = model_inputs(args, run, data, vae, batch, draws)
            train_step(args, run, state.model, diffusion, state, x, draws, kwargs)
            return time.perf_counter() - start

        times = {"on the fly": [], "cache": []}
        for i in range(1 + rounds):
            for name in ("on the fly", "cache") if i % 2 else ("cache", "on the fly"):
                seconds = step(cache if name == "cache" else images, i)
                if i:
                    times[name].append(seconds)
    result = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.model} {image_size} px, batch {batch_size}, {torch.get_num_threads()} threads, median of {rounds} "
        f"interleaved rounds: on the fly {result['on the fly']:.3f} s/step, from the cache {result['cache']:.3f} "
        f"s/step ({result['on the fly'] / result['cache']:.2f}x); building the cache ({batch_size} images and their "
        f"flips): {encode_once:.1f} s"
    )
    for k, v in times.items():
        print(f"  {k}: {' '.join(f'{t:.2f}' for t in v)} s")
    return result


if __name__ == "__main__":
    main(parser().parse_args())
