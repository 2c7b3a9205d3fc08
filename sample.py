"""Sample from a train.py checkpoint: DDPM-250 with classifier-free guidance, sharded over ranks, ADM .npz output.

    python sample.py --ckpt results/000-DiT-L-2/checkpoints/0400000.pt            # 64 images and grid.png
    torchrun --nproc_per_node=8 sample.py --ckpt results/.../0400000.pt --num-samples 50000 --cfg-scale 1.5
    python sample.py --ckpt results/001-DiT-T-2-dtr/checkpoints/0003000.pt --prompts prompts.txt   # text-to-image
    torchrun --nproc_per_node=8 sample.py --ckpt ... --captions captions_val2014.json --num-samples 30000 \\
        --cfg-scale 1.5

The checkpoint defines the model and its diffusion (see load_checkpoint); the flags choose how to sample.
Sample i starts from the noise of seed `--seed + i` and draws every step's noise from it, and its label is entry i
of one label stream seeded with --seed, so a command gives the same images for any number of ranks and any batch
size (bit for bit on the CPU; GPU kernels may round another batch shape differently), and a run's first k samples
are those of a longer run. The images go to DIR/samples_{N}x{H}x{W}x3.npz (arr_0: uint8 NHWC, arr_1: int64 labels,
or captions: str for text models), the format openai's ADM evaluator and fid.py read.

With --eval REF every rank also extracts fid.py's features from its samples as they are made, and rank 0 writes
DIR/metrics.json and DIR/sample_stats.npz (a fid.py --save-stats file); --no-images keeps no image at all:

    torchrun --nproc_per_node=8 sample.py --ckpt ... --num-samples 50000 --cfg-scale 1.5 \\
        --eval VIRTUAL_imagenet256_labeled.npz --metrics fid,sfid,is,pr,kid,fd_dinov2 --no-images
"""

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import dtr
import fid

SETTINGS_OFF = {
    "eval_features": [],
    "eval_protocol": None,
    "no_images": False,
}  # run.json keys a run may lack: their off values
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


#################################################################################
#                                    Sampling                                   #
#################################################################################


def main(args):
    """Sample args.num_samples images on every rank of torchrun (or in one process) and merge them on rank 0."""
    with dtr.one_line_errors("sample.py"):
        sample(args)


def sample(args):
    """main's body; bad input raises dtr.InputError."""
    # Ranks may finish up to a shard apart before the final barrier: allow more than the default 10-30 minutes.
    rank, world, device = dtr.setup_distributed(timeout=timedelta(hours=2))
    with dtr.shared_errors():  # the same checks on every rank: one line, from rank 0
        model_args, state = load_checkpoint(
            args.ckpt, args.weights, args.model, args.image_size, args.vae, args.vae_path, args.text_encoder
        )
        check_args(args, model_args)
        captions = None if model_args.get("context_dim", None) is None else text_captions(args)
    run(args, model_args, state, rank, world, device, captions)
    if dist.is_initialized():  # not after an error: the ranks stop at once (dtr.exit_now)
        dist.destroy_process_group()


def run(args, model_args, state, rank, world, device, captions=None):
    """The body of main, once every rank has joined; captions (N,) for text models."""
    with dtr.shared_errors():
        model = load_model(model_args, state, device)
        if args.compile:  # in place, so that forward_with_cfg's self(...) runs compiled too
            try:
                model.compile(backend=args.compile)
            except RuntimeError as e:  # an unknown backend
                raise dtr.InputError(f"--compile {args.compile}: {e}")
        text = None if captions is None else load_text_encoder(model_args, device)
    diffusion = dtr.build_diffusion(model_args, str(args.num_sampling_steps))
    conditional = model_args["num_classes"] > 1
    labels = dtr.make_labels(model_args["num_classes"], args.num_samples, args.seed, args.class_labels)
    labels = labels if conditional else None  # (N,) int64
    condition, record = conditioning(labels, captions, text, model_args.get("text_mask", False))
    out = args.out or default_out(args, model_args)
    files = paths(out, args.num_samples, model_args["image_size"])
    ranges = shard_ranges(args.num_samples, args.shard_size)
    settings = run_settings(args, model_args, captions)
    metrics = fid.parse_metrics(args.metrics) if args.eval else ()
    names = list(dict.fromkeys(fid.METRICS[m] for m in metrics))  # the feature networks (--eval)
    settings.update(eval_features=names, eval_protocol=args.protocol if names else None, no_images=args.no_images)
    final = files.metrics if args.eval else files.npz  # written last: the run is complete once it exists
    reference = fid.open_source(args.eval, names) if args.eval else None  # a bad REF stops before anything is written
    todo = dtr.from_rank0(
        lambda: prepare_out(out, files, settings, len(ranges), args.resume, args.overwrite, args.save_png, final),
        rank,
        world,
    )
    if todo is None:  # every sample is made
        if args.eval:
            rescore(args, files, reference, metrics, rank, world, device)
        elif rank == 0:
            print(f"{final} is already complete")
        return
    with dtr.shared_errors():
        vae = dtr.load_vae(model_args["vae"], model_args["vae_path"], device) if model_args["vae"] else None
    if rank == 0 and len(todo) < len(ranges):
        print(f"resuming: {len(ranges) - len(todo)} of {len(ranges)} shards already done")
    networks = fid.load_networks(names, device, args.inception_weights, args.dinov2_weights, rank, world)
    mine = todo[rank::world]  # round-robin over the unfinished shards
    start_time = time.time()
    where = dict(ranges=ranges, files=files, vae=vae, device=device, progress=rank == 0, networks=networks)
    sample_shards(model, diffusion, mine, args=args, condition=condition, record=record, **where)
    if world > 1:
        dist.barrier()
    seconds = time.time() - start_time
    if args.eval:  # every rank extracts a share of REF's features
        ref_feats = fid.source_features(reference, networks, args.batch_size, args.protocol, progress=rank == 0)
    if rank:
        return
    shards = [shard_file(files, k) for k in range(len(ranges))]
    if not args.no_images:
        image_shape = (model_args["image_size"], model_args["image_size"], 3)
        extras = tuple(record(np.arange(0)))  # the names of the per-sample arrays saved with the images
        save_grid(files.grid, merge_shards(files.npz, shards, ranges, image_shape, extras))
    made = sum(ranges[k][1] - ranges[k][0] for k in todo)
    print(
        f"{args.num_samples} samples, {made} sampled now on {world} rank(s) in {seconds:.1f} s "
        f"({made / max(seconds, 1e-9):.2f} images/s){'' if args.no_images else f'; wrote {files.npz}'}"
    )
    if args.eval:
        evaluate_samples(shards, fid.statistics(ref_feats, reference[1]), files, metrics, args)
    shutil.rmtree(files.shards)


def check_args(args, model_args):
    """Refuse sampling choices the model cannot honour: one clear line each."""
    if args.num_samples <= 0 or args.batch_size <= 0 or args.shard_size <= 0:
        raise dtr.InputError("--num-samples, --batch-size and --shard-size must be positive")
    if not 0 < args.num_sampling_steps <= model_args["num_timesteps"]:
        raise dtr.InputError(
            f"--num-sampling-steps must be in 1..{model_args['num_timesteps']}, got {args.num_sampling_steps}"
        )
    if args.eta < 0 or (args.eta and args.sampler != "ddim"):
        raise dtr.InputError("--eta must be >= 0 and applies to --sampler ddim only")
    if args.seed < 0:
        raise dtr.InputError(f"--seed must be >= 0, got {args.seed}")
    if args.resume and args.overwrite:
        raise dtr.InputError("pass --resume or --overwrite, not both")
    if args.eval is None and args.no_images:
        raise dtr.InputError("--no-images keeps only features: it needs --eval REF")
    if args.no_images and args.save_png:
        raise dtr.InputError("pass --save-png or --no-images, not both")
    if args.cfg_scale < 0:
        raise dtr.InputError(f"--cfg-scale must be >= 0 (1: no guidance), got {args.cfg_scale}")
    channels = 4 if model_args["vae"] else 3  # the eps channels: VAE latents or RGB
    if args.guided_channels is not None and not 1 <= args.guided_channels <= channels:
        raise dtr.InputError(
            f"--guided-channels must be in 1..{channels} (the model's noise channels), got {args.guided_channels}"
        )
    if args.guided_channels is not None and args.cfg_scale == 1:
        warn("--cfg-scale 1 runs no guidance; --guided-channels ignored")
    text = model_args.get("context_dim", None) is not None
    conditional = model_args["num_classes"] > 1 or text
    if args.cfg_scale != 1 and not (conditional and model_args["class_dropout_prob"] > 0):
        why = (
            "is unconditional"
            if not conditional
            else "was trained without caption dropout (no null context)"
            if text
            else "was trained without label dropout (no null class)"
        )
        raise dtr.InputError(f"--cfg-scale {args.cfg_scale} needs guidance, but the model {why}; use --cfg-scale 1")
    if text:
        if args.class_labels:
            raise dtr.InputError(
                "--class-labels is for class-conditional models; this one is text-to-image (--prompts, --captions)"
            )
        if (args.prompts is None) == (args.captions is None):
            raise dtr.InputError(
                "a text-to-image model needs its captions: --prompts FILE or --captions COCO.json (one of them)"
            )
        return
    if args.prompts is not None or args.captions is not None:
        raise dtr.InputError("--prompts and --captions are for text-to-image models; this one takes class labels")
    bad = [y for y in args.class_labels or [] if not 0 <= y < model_args["num_classes"]]
    if conditional and bad:
        raise dtr.InputError(f"class label {bad[0]} is out of range 0..{model_args['num_classes'] - 1}")
    if args.class_labels and not conditional:
        warn("the model is unconditional; --class-labels ignored")


def sample_shards(
    model, diffusion, shards, *, args, ranges, files, condition, record, vae=None, device="cpu", progress=False,
    networks=(),
):  # fmt: skip
    """Sample the shards `shards`, batch by batch, writing each to its own file once complete (atomically, in
    DIR/.shards/, so an interrupted run keeps every finished shard for --resume).

    condition(i) -> (y, context_mask) of the samples i; record(i) -> the arrays saved with their images;
    `networks`: fid.py's feature networks, whose features of each batch are saved too (--eval)."""
    from tqdm import tqdm

    autocast = nullcontext() if args.precision == "fp32" else torch.autocast(device.type, PRECISIONS[args.precision])
    bar = tqdm(
        total=sum(ranges[k][1] - ranges[k][0] for k in shards), unit="img", disable=not progress, dynamic_ncols=True
    )
    for k in shards:
        start, end = ranges[k]
        index = np.arange(start, end)
        batches, features = [], []
        for b in range(0, len(index), args.batch_size):
            i = index[b : b + args.batch_size]
            y, mask = condition(i)
            with autocast:
                batches.append(
                    dtr.generate(
                        model,
                        diffusion,
                        y,
                        args.seed + i,
                        cfg_scale=args.cfg_scale,
                        guided_channels=args.guided_channels,
                        vae=vae,
                        device=device,
                        sampler=args.sampler,
                        eta=args.eta,
                        context_mask=mask,
                    ).numpy()
                )
            if networks:  # as fid.py computes them from the saved images (tested bit-identical on CPU)
                feats = fid.batch_features(networks, torch.from_numpy(batches[-1]).to(device), args.protocol)
                features.append({name: v.cpu().numpy() for name, v in feats.items()})
            bar.update(len(i))
        images = np.concatenate(batches)  # (n, H, W, 3) uint8
        if args.save_png:
            save_pngs(files.pngs, images, start)
        arrays = {} if args.no_images else {"arr_0": images}
        arrays.update({name: np.concatenate([f[name] for f in features]) for name in features[0]} if features else {})
        dtr.save_npz(shard_file(files, k), {**arrays, **record(index), "index": index})
    bar.close()


def conditioning(labels, captions, text, text_mask):
    """(condition, record) for sample_shards: from class labels (N,), captions (N,) through the text encoder, or
    none."""
    if captions is not None:

        def condition(i):
            context, mask = text([str(c) for c in captions[i]])
            return context, mask if text_mask else None

        return condition, lambda i: {"captions": captions[i]}
    if labels is not None:
        return (lambda i: (labels[i], None)), (lambda i: {"arr_1": labels[i]})
    return (lambda i: (None, None)), (lambda i: {})


def load_text_encoder(model_args, device):
    """The checkpoint's CLIP text encoder, checked to be the one its model was trained with."""
    text = dtr.TextEncoder(model_args["text_encoder"], device)
    if text.digest != model_args["text_digest"]:
        raise dtr.InputError(
            f"the text encoder {model_args['text_encoder']} is not the one the model was trained with (digest "
            f"{text.digest}, trained with {model_args['text_digest']}); pass that one with --text-encoder"
        )
    return text


def evaluate_samples(shards, ref_stats, files, metrics, args):
    """Rank 0: the samples' features from the shards -> DIR/sample_stats.npz and the metrics, printed and in
    DIR/metrics.json."""
    feats = {}
    check_shards(shards)
    for shard in shards:
        with np.load(shard) as z:
            for name in fid.FEATURE_KEYS + ("spatial",):
                if name in z.files:
                    feats.setdefault(name, []).append(z[name])
    stats = fid.statistics({name: np.concatenate(v) for name, v in feats.items()})
    dtr.save_npz(files.stats, stats)
    score(ref_stats, stats, files, metrics, args)
    print(f"wrote {files.stats} and {files.metrics}")


def score(ref_stats, stats, files, metrics, args):
    """Rank 0: the metrics, printed and in DIR/metrics.json with REF's path and digest (source_digest)."""
    record = {"reference": os.path.abspath(args.eval), "reference_digest": source_digest(args.eval)}
    fid.score(ref_stats, stats, metrics, args.protocol, files.metrics, **record)


def rescore(args, files, reference, metrics, rank, world, device):
    """Every rank, a finished --eval run resumed: unless `scored` finds every metric asked in DIR/metrics.json against
    this REF, score them all anew from the samples' saved features (DIR/sample_stats.npz) and REF's, extracted over
    all ranks."""
    if dtr.from_rank0(lambda: scored(files, args.eval, metrics), rank, world):
        if rank == 0:
            print(f"{files.metrics} is already complete")
        return
    networks = None
    if reference[0] is not None:  # REF's images, not saved features
        names = list(dict.fromkeys(fid.METRICS[m] for m in metrics))
        networks = fid.load_networks(names, device, args.inception_weights, args.dinov2_weights, rank, world)
    ref_feats = fid.source_features(reference, networks, args.batch_size, args.protocol, progress=rank == 0)
    if rank == 0:
        _, saved = fid.load_source(files.stats)
        score(fid.statistics(ref_feats, reference[1]), fid.statistics({}, saved), files, metrics, args)
        print(f"wrote {files.metrics}")


def scored(files, ref, metrics):
    """Rank 0, a finished --eval run resumed: True if DIR/metrics.json holds every metric asked against REF (the same
    path and digest); False if the samples' saved features can score them anew (the metrics.json written then names
    REF and the metrics asked, nothing else); else an InputError naming the features missing."""
    try:
        with open(files.metrics) as f:
            done = json.load(f)
    except (OSError, ValueError):
        done = {}
    same = done.get("reference") == os.path.abspath(ref) and done.get("reference_digest") == source_digest(ref)
    if same and set(metrics) <= set(done.get("metrics", ())):
        return True
    _, saved = fid.load_source(files.stats)
    for m in metrics:
        if not fid.SAVED_FEATURES[fid.METRICS[m]] <= saved.keys():
            raise dtr.InputError(
                f"--resume: {files.stats} holds no {fid.METRICS[m]} features of the samples, which --metrics {m} "
                f"needs; sample into another --out (or score the kept images with fid.py)"
            )
    return False


def source_digest(path):
    """sha256 of a REF file's bytes, or of a REF folder's image names and sizes (the files fid.py reads)."""
    if not os.path.isdir(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(path) if n.lower().endswith(fid.IMAGE_EXTENSIONS)):
        h.update(f"{name}\t{os.path.getsize(os.path.join(path, name))}\n".encode())
    return h.hexdigest()


def is_main():
    """True on rank 0 under torchrun, and in a single process."""
    return os.environ.get("RANK", "0") == "0"


def warn(msg):
    """One line on stderr, from rank 0 only."""
    if is_main():
        print(f"sample.py: warning: {msg}", file=sys.stderr)


#################################################################################
#                    Labels, shards and the settings of a run                   #
#################################################################################


def read_prompts(path):
    """The non-empty lines of a text file, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise dtr.InputError(f"cannot read prompts {path} ({type(e).__name__})")
    if not prompts:
        raise dtr.InputError(f"{path} holds no prompts")
    return prompts


def make_captions(num_samples, seed, prompts=None, coco=None):
    """Captions (N,) str: prompts repeated (sample i gets prompts[i % len]), or for COCO's captions (a list per image)
    the FID protocol: distinct images in an order seeded by `seed` (reshuffled after each pass), and a uniformly
    drawn one of each image's captions. Caption i never depends on N."""
    if prompts:
        return np.array([prompts[i % len(prompts)] for i in range(num_samples)])
    passes = -(-num_samples // len(coco))
    order = np.concatenate([np.random.default_rng([seed, 0, e]).permutation(len(coco)) for e in range(passes)])
    u = np.random.default_rng([seed, 1]).random(num_samples)
    return np.array([coco[j][int(v * len(coco[j]))] for j, v in zip(order, u)])


def text_captions(args):
    """Every sample's caption (N,) str, from --prompts or --captions."""
    if args.prompts is not None:
        return make_captions(args.num_samples, args.seed, prompts=read_prompts(args.prompts))
    coco = [captions for _, captions in dtr.read_coco_captions(args.captions)]
    return make_captions(args.num_samples, args.seed, coco=coco)


def shard_ranges(num_samples, shard_size):
    """Consecutive index ranges [(start, end)] of at most shard_size samples covering [0, N), whatever the number of
    ranks: the unit of --resume; run() deals the unfinished ones round-robin to the ranks."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def default_out(args, model_args):
    """samples/<model>-<checkpoint>-<weights>-<sampler><steps>-cfg<scale>[g<guided channels>]-seed<seed>."""
    return os.path.join(
        "samples",
        "-".join(
            [
                model_args["model"].replace("/", "-"),
                os.path.splitext(os.path.basename(args.ckpt))[0],
                args.weights,
                f"{args.sampler}{args.num_sampling_steps}",
                f"cfg{args.cfg_scale}" + ("" if args.guided_channels is None else f"g{args.guided_channels}"),
                f"seed{args.seed}",
            ]
        ),
    )


def paths(out, num_samples, image_size):
    """Files of a run in `out`: settings, shard folder, PNG folder, grid, and the final .npz.

    run.json (the settings), .shards/ (removed at the end), images/{i:06d}.png (--save-png), grid.png (the first
    64 samples, 8 wide), samples_{N}x{H}x{W}x3.npz; with --eval also sample_stats.npz and metrics.json."""
    return argparse.Namespace(
        settings=os.path.join(out, "run.json"),
        shards=os.path.join(out, ".shards"),
        pngs=os.path.join(out, "images"),
        grid=os.path.join(out, "grid.png"),
        npz=os.path.join(out, f"samples_{num_samples}x{image_size}x{image_size}x3.npz"),
        stats=os.path.join(out, "sample_stats.npz"),
        metrics=os.path.join(out, "metrics.json"),
    )


def shard_file(files, k):
    return os.path.join(files.shards, f"shard-{k:06d}.npz")


def run_settings(args, model_args, captions=None):
    """Everything that decides the images (and so must match when resuming); not the ranks or the batch size."""
    keys = (
        "weights",
        "num_samples",
        "seed",
        "class_labels",
        "cfg_scale",
        "guided_channels",
        "sampler",
        "num_sampling_steps",
        "eta",
        "precision",
        "shard_size",
        "save_png",
    )
    settings = dict(ckpt=os.path.abspath(args.ckpt), model_args=model_args, **{k: getattr(args, k) for k in keys})
    if captions is not None:  # text models: every sample's caption
        settings["captions_sha256"] = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    return json.loads(json.dumps(settings, default=str))


def prepare_out(out, files, settings, num_shards, resume=False, overwrite=False, save_png=False, final=None):
    """Rank 0: check or clear the output folder, record the settings -> the shards still to sample (None: done,
    i.e. `final`, by default the merged .npz, exists).

    An existing run is never overwritten: --resume samples only the missing shards, with any number of ranks and any
    batch size but the same settings (checked against run.json); --overwrite deletes the files a run writes and starts
    over."""
    ours = [p for p in vars(files).values() if os.path.exists(p)]
    if ours and overwrite:  # only the files a run writes are deleted
        for p in ours:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    elif ours and not resume:
        raise dtr.InputError(
            f"{out} already holds samples; pass --resume to finish an interrupted run or --overwrite to redo it"
        )
    elif ours:
        if not os.path.exists(files.settings):
            raise dtr.InputError(f"--resume: {out} holds samples but no run.json; pass --overwrite to redo them")
        with open(files.settings) as f:
            before = json.load(f)
        complete = os.path.exists(final or files.npz)
        # a key missing from run.json has its off value (SETTINGS_OFF); once every sample is made, the features it saved,
        # not the networks named now, decide what a resumed --eval can score (scored)
        changed = [
            k
            for k in settings
            if before.get(k, SETTINGS_OFF.get(k)) != settings[k] and not (complete and k == "eval_features")
        ]
        if changed:
            raise dtr.InputError(
                f"--resume: {out} was sampled with other settings ({', '.join(changed)}); use another --out"
            )
        if complete:
            return None
    os.makedirs(files.shards, exist_ok=True)
    if save_png:
        os.makedirs(files.pngs, exist_ok=True)
    if not os.path.exists(files.settings):
        dtr.atomic_write(files.settings, lambda tmp: dtr.write_text(tmp, json.dumps(settings, indent=2) + "\n"))
    return [k for k in range(num_shards) if not os.path.exists(shard_file(files, k))]


#################################################################################
#                                    Outputs                                    #
#################################################################################


def check_shards(shard_files):
    """Raise InputError naming the first shard file that does not exist."""
    missing = [f for f in shard_files if not os.path.isfile(f)]
    if missing:  # e.g. ranks on other machines wrote theirs to a folder this one cannot see
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise dtr.InputError(
            f"shard {missing[0]}{more} is missing: put --out on a filesystem every rank shares, or rerun with "
            f"--resume to sample the missing shards here"
        )


def merge_shards(path, shard_files, ranges, image_shape, keys=()):
    """Stream the shards into one uncompressed ADM .npz (arr_0 uint8 NHWC, then the per-sample arrays `keys`, e.g.
    arr_1 int64 labels or captions str) -> its first 64 images.

    The shards are read in order, one at a time, so the samples are never all in memory; the .npz is written
    atomically. A missing shard (e.g. ranks on machines that share no --out folder) stops with one line."""
    check_shards(shard_files)
    first, extras = [], {k: [] for k in keys}

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:  # what np.save writes, one shard at a time
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": (ranges[-1][1], *image_shape)}
                )
                for shard, (start, end) in zip(shard_files, ranges):
                    with np.load(shard) as z:
                        images, index = z["arr_0"], z["index"]
                        expected = (end - start, *image_shape)
                        if images.shape != expected or not np.array_equal(index, np.arange(start, end)):
                            raise dtr.InputError(
                                f"{shard} does not hold samples {start}..{end - 1}; delete it and --resume"
                            )
                        f.write(np.ascontiguousarray(images, dtype=np.uint8).data)
                        for k in keys:
                            extras[k].append(z[k])
                        first.extend(images[: 64 - len(first)])
            for k in keys:
                with zf.open(f"{k}.npy", "w") as f:
                    np.save(f, np.concatenate(extras[k]))

    dtr.atomic_write(path, write)
    return np.stack(first)


def save_grid(path, images):
    """First images (n, H, W, 3) uint8 -> an 8-wide PNG grid."""
    from torchvision.utils import save_image

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    dtr.atomic_write(path, lambda tmp: save_image(x, tmp, nrow=8, format="png"))


def save_pngs(folder, images, start):
    """Images (n, H, W, 3) uint8 -> folder/{start + j:06d}.png."""
    from PIL import Image

    for j, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{start + j:06d}.png"))


#################################################################################
# Checkpoint -> model, diffusion and VAE (ours, facebookresearch/DiT's, official DTR's)#
#################################################################################


def load_checkpoint(path, weights="ema", model=None, image_size=None, vae=None, vae_path=None, text_encoder=None):
    """(model_args with vae_path, state dict) of a train.py checkpoint, an official DTR or DiT training checkpoint, or a
    bare state dict; the flags fill what the checkpoint does not say. The decoder: `vae_path` if given, else for an
    explicit `vae` that kind's hub copy (not the path training used), else the checkpoint's kind and path.

    train.py's: everything from its model_args. facebookresearch/DiT's (a bare state dict) needs --model and
    --image-size; classes, null class, learned sigma and latent vs pixel input are read off the weights, with DiT's
    linear schedule and no routing (plain_args). The official DTR code's ({"model", "ema", "opt", "config"}, each
    block's masks stored as blocks.{i}.routing._unit_mapping): read from its hydra config (config_args; needs
    omegaconf), its DTR masks checked against ours and its R-TR masks adopted (check_masks); one of its state dicts
    without the config: routing, beta and alpha from its masks (mask_args), with a warning."""
    ckpt = dtr.read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise dtr.InputError(f"{path} is not a checkpoint (a {type(ckpt).__name__})")
    given = ckpt.get("args")
    given = vars(given) if isinstance(given, argparse.Namespace) else given  # facebookresearch/DiT saves a Namespace
    config = ckpt.get("config")  # the official DTR code saves its hydra config
    if weights in ckpt and isinstance(ckpt[weights], dict):
        state = ckpt[weights]
    elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise dtr.InputError(f"{path} has no {weights!r} weights (keys: {', '.join(map(str, ckpt))})")
    state = dtr.unwrap_state_dict(state)
    trained = dtr.checkpoint_model_args(ckpt)
    if trained is not None:  # train.py: everything is in the checkpoint
        for flag, name in ((model, "model"), (image_size, "image_size")):
            if flag is not None and flag != trained[name]:
                raise dtr.InputError(f"--{name.replace('_', '-')} {flag} contradicts the checkpoint's {trained[name]}")
        if vae is not None and trained["vae"] is None:
            raise dtr.InputError("--vae applies to latent models; this checkpoint's model works on pixels")
        if text_encoder is not None and trained["context_dim"] is None:
            raise dtr.InputError("--text-encoder applies to text-to-image models; this checkpoint's model is not one")
        args = dict(
            trained,
            vae=vae or trained["vae"],
            vae_path=None if vae else given.get("vae_path"),  # an explicit --vae: that kind's decoder, not training's
            text_encoder=text_encoder or trained["text_encoder"],
        )
    else:
        given = given or {}
        if text_encoder is not None:
            raise dtr.InputError("--text-encoder applies to text-to-image models; this checkpoint's model is not one")
        if config is not None:  # official DTR: model, image size and VAE from its config
            given = {
                name: setting(config, key)
                for name, key in (("model", "models.name"), ("image_size", "general.image_size"))
            }
            for flag, name in ((model, "model"), (image_size, "image_size")):
                if flag is not None and flag != given[name]:
                    raise dtr.InputError(
                        f"--{name.replace('_', '-')} {flag} contradicts the checkpoint's {given[name]}"
                    )
            vae = vae or setting(config, "general.vae")
        args = plain_args(state, model or given.get("model"), image_size or given.get("image_size"), vae, config)
    return dict(args, vae_path=vae_path or args.get("vae_path")), state


def load_model(model_args, state, device):
    """The model `model_args` describe with the weights `state`, for inference on `device`."""
    model = dtr.build_model(model_args)
    check_masks(model, state)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise dtr.InputError(
            f"the checkpoint's weights do not fit {model_args['model']}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, "
            f"{len(shapes)} mis-shaped keys (e.g. {example})"
        )
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def check_masks(model, state):
    """Drop the official DTR code's stored masks, after checking that they are the masks this model derives; R-TR
    masks, which the official code draws from numpy's unseeded global generator, are adopted as this model's instead."""
    stored = {k: state.pop(k) for k in [k for k in state if k.endswith(dtr.MASK_KEY)]}
    tables, router = list(model.router.buffers()), model.router
    adopt = router.kind == "random"
    if adopt and stored and len(stored) != router.num_blocks:
        raise dtr.InputError(
            f"the checkpoint has R-TR masks for {len(stored)} of its model's {router.num_blocks} blocks"
        )
    for key, masks in stored.items():
        i = int(key.split(".")[1])  # blocks.{i}.routing._unit_mapping
        ours = tables[router.table_of_block[i]] if tables and i < router.num_blocks else None
        if adopt and ours is not None:
            if masks.shape != ours.shape:
                raise dtr.InputError(
                    f"the checkpoint's {key} has shape {tuple(masks.shape)}; this model's R-TR masks have "
                    f"{tuple(ours.shape)}"
                )
            active = int(ours[0].sum())  # int(beta * C), as ours are drawn
            if not ((masks == 0) | (masks == 1)).all() or not (masks.sum(dim=1) == active).all():
                raise dtr.InputError(
                    f"the checkpoint's {key} is not a 0/1 table with {active} (= int(beta*C)) ones in every row"
                )
            ours.copy_(masks != 0)
        elif ours is None or masks.shape != ours.shape or not torch.equal(masks != 0, ours):
            raise dtr.InputError(f"the checkpoint's {key} differs from this model's {router.kind} masks")


# A bare state dict is read as a facebookresearch/DiT checkpoint: DiT's diffusion and no routing.
# fmt: off
PLAIN_ARGS = dict(dtr.model_args({}), vae_path=None, routing="none", alpha=4.0, beta=0.8, routing_seed=0,
                  num_timesteps=1000, noise_schedule="linear")
# fmt: on
# The official DTR code (byeongjun-park/DTR) fixes alpha and the number of diffusion steps in code, not in its config;
# its config's default schedule is cosine. Its routing.init_method names our routing kinds.
OFFICIAL_ALPHA, OFFICIAL_STEPS, OFFICIAL_SCHEDULE = 4.0, 1000, "cosine"
OFFICIAL_ROUTINGS = {"DTR": "dtr", "random": "random"}


def plain_args(state, model, image_size, vae, config=None):
    """Training arguments of a state dict without train.py's, read off its shapes (classes, null class, sigma, latent
    or pixel); routing and schedule from the official DTR code's `config` if given, else from its masks if any."""
    if model is None or image_size is None:
        raise dtr.InputError("the checkpoint holds no training arguments; name its --model and --image-size")
    if model not in dtr.DiT_models:
        raise dtr.InputError(
            f"a checkpoint without training arguments is read as facebookresearch/DiT's; {model!r} is not a DiT"
        )
    try:
        c_in, patch = state["x_embedder.proj.weight"].shape[1:3]
        c_out = state["final_layer.linear.weight"].shape[0] // patch**2
        rows = state["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as e:
        raise dtr.InputError(f"the checkpoint is not a DiT state dict (no {e.args[0]})")
    if c_in not in (3, 4):
        raise dtr.InputError(
            f"the checkpoint's DiT takes {c_in} input channels; expected 4 (VAE latents) or 3 (pixels)"
        )
    args = dict(
        PLAIN_ARGS,
        model=model,
        image_size=image_size,
        vae=(vae or "ema") if c_in == 4 else None,
        num_classes=max(rows - 1, 1),
        class_dropout_prob=0.1 if rows > 1 else 0.0,  # DiT: null row if > 1 class
        learn_sigma=c_out == 2 * c_in,
    )
    if config is not None:
        return dict(args, **config_args(config))
    masks = {k: v for k, v in state.items() if k.endswith(dtr.MASK_KEY)}
    return dict(args, **mask_args(masks)) if masks else args


def setting(config, path):
    """The value at a dotted path ('general.schedule_name') of the official DTR code's hydra config."""
    node = config
    for key in path.split("."):
        if not hasattr(node, "keys") or key not in node:
            raise dtr.InputError(f"the checkpoint's config has no {path}")
        node = node[key]  # a DictConfig resolves interpolations such as ${data.num_classes} here
    return node


def config_args(config):
    """Routing, schedule and classes of an official DTR checkpoint, from the hydra config its train.py saves with it."""
    kind = setting(config, "models.routing.init_method")
    if kind not in OFFICIAL_ROUTINGS:
        raise dtr.InputError(
            f"the checkpoint's config has routing init_method {kind!r}; expected {' or '.join(OFFICIAL_ROUTINGS)}"
        )
    beta, tasks = float(setting(config, "models.routing.sharing_ratio")), setting(config, "models.routing.taskcount")
    if not 0 < beta <= 1:
        raise dtr.InputError(f"the checkpoint's config has sharing_ratio (beta) {beta}; expected a value in (0, 1]")
    if tasks != OFFICIAL_STEPS:  # the official diffusion always has 1000 steps; masks of other lengths do not fit it
        raise dtr.InputError(
            f"the checkpoint's config has taskcount {tasks}; the official code samples {OFFICIAL_STEPS} steps"
        )
    schedule = setting(config, "general.schedule_name")
    if schedule not in ("linear", "cosine"):
        raise dtr.InputError(f"the checkpoint's config has schedule_name {schedule!r}; expected 'linear' or 'cosine'")
    classes = 1 if setting(config, "data.is_uncond") else int(setting(config, "data.num_classes"))
    return dict(
        routing=OFFICIAL_ROUTINGS[kind],
        alpha=OFFICIAL_ALPHA,
        beta=beta,
        num_timesteps=tasks,
        noise_schedule=schedule,
        num_classes=classes,
        class_dropout_prob=0.1 if classes > 1 else 0.0,
    )


def mask_beta(active, channels):
    """The shortest decimal beta in (0, 1] with int(beta * C) == active (the official code keeps int(C * beta))."""
    for decimals in range(1, 7):
        low = math.floor(active / channels * 10**decimals)
        for beta in (low / 10**decimals, (low + 1) / 10**decimals):
            if 0 < beta <= 1 and int(beta * channels) == active:
                return beta
    return (active + 0.5) / channels


def mask_alpha(table, beta):
    """The alpha whose DTR masks are `table` (T, C) bool, or None. Tries 4 (the official code's), then 0.01..10 from
    the coarsest decimals: any alpha that gives the same masks gives the same model."""
    tasks, channels = table.shape
    start = table.int().argmax(dim=1).numpy()  # (T,) first active channel of each row
    frac, free = np.linspace(0, 1, tasks), channels - int(beta * channels)
    for alpha in dict.fromkeys([OFFICIAL_ALPHA] + [k / 100 for step in (100, 10, 1) for k in range(step, 1001, step)]):
        # dtr_masks' offsets, computed as it does; only a match is then checked in full
        if np.array_equal((frac**alpha * free).round(), start) and torch.equal(
            dtr.dtr_masks(tasks, channels, alpha, beta).bool(), table
        ):
            return alpha
    return None


def mask_args(masks):
    """Routing and schedule of an official DTR state dict without its config, from its masks {key: (T, C)}: beta from
    the row sums, DTR with the alpha that reproduces them, else R-TR (its masks are then used as they are)."""
    tables = [m != 0 for m in masks.values()]
    counts = torch.cat([t.sum(dim=1) for t in tables]).unique()
    if len(counts) != 1 or not counts.item():
        raise dtr.InputError(
            "the checkpoint's routing masks do not keep one number of channels per task; cannot tell its beta"
        )
    tasks, channels = tables[0].shape
    if tasks != OFFICIAL_STEPS:
        raise dtr.InputError(
            f"the checkpoint's routing masks have {tasks} tasks; the official code samples {OFFICIAL_STEPS} steps"
        )
    beta = mask_beta(counts.item(), channels)
    same = all(t.shape == tables[0].shape and torch.equal(t, tables[0]) for t in tables)
    alpha = mask_alpha(tables[0], beta) if same else None
    routing = f"DTR with alpha {alpha:g}" if alpha is not None else "R-TR with the checkpoint's own masks (not DTR's)"
    warn(
        f"the checkpoint has the official DTR code's masks but no config: assuming {routing}, beta {beta:g} (from the "
        f"masks), the {OFFICIAL_SCHEDULE} schedule (the official default) and {OFFICIAL_STEPS} steps"
    )
    return dict(
        routing="dtr" if alpha is not None else "random",
        alpha=OFFICIAL_ALPHA if alpha is None else alpha,
        beta=beta,
        num_timesteps=OFFICIAL_STEPS,
        noise_schedule=OFFICIAL_SCHEDULE,
    )


#################################################################################
#                                  Command line                                 #
#################################################################################


def parser():
    """The command line; a bad argument stops with one line, like every other bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = functools.partial(dtr.exit_one_line, "sample.py")  # one line instead of usage + message
    p.add_argument(
        "--ckpt", required=True, help="a train.py checkpoint, an official DTR one, or a facebookresearch/DiT state dict"
    )
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights")
    p.add_argument("--model", default=None, help="only for checkpoints without training arguments or config (DiT's)")
    p.add_argument("--image-size", type=int, default=None, help="only for checkpoints without training arguments")
    p.add_argument(
        "--vae",
        choices=["ema", "mse"],
        default=None,
        help="latent models' decoder (default: the training run's, from its --vae-path if it had one); a kind named "
        "here loads stabilityai/sd-vae-ft-KIND (or --vae-path), never the training run's path",
    )
    p.add_argument("--vae-path", default=None, help="a local copy of the VAE (diffusers format)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="per rank; does not change the images")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--num-sampling-steps", type=int, default=250, help="respaced evenly over T (DDIM too)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    p.add_argument(
        "--cfg-scale", type=float, default=1.0, help="1: no guidance, no unconditional batch (the paper's FID: 1.5)"
    )
    p.add_argument(
        "--guided-channels",
        type=int,
        default=None,
        help="guide only the first N noise channels (default: all; facebookresearch/DiT's FIDs: 3)",
    )
    p.add_argument(
        "--class-labels",
        type=int,
        nargs="+",
        default=None,
        help="sample i gets label[i %% len]; default: uniform random labels from --seed",
    )
    p.add_argument("--prompts", default=None, help="text models: prompts, one a line; sample i gets line i %% len")
    p.add_argument(
        "--captions",
        default=None,
        help="text models: COCO captions_*.json; one random caption per image "
        "(images in a random order from --seed), recorded in the .npz",
    )
    p.add_argument(
        "--text-encoder", default=None, help="text models: a local copy of the checkpoint's CLIP text encoder"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sample i uses seed + i: runs with seeds s and s+1 share all but one sample's noise; offset --seed by at "
        "least --num-samples for an independent set",
    )
    p.add_argument(
        "--precision", choices=list(PRECISIONS), default="fp32", help="torch.autocast around the network and the VAE"
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the network (backend default: inductor; compiles again for a new batch size)",
    )
    p.add_argument("--out", default=None, help="output folder (default: samples/<model>-<ckpt>-<settings>)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file (the unit of --resume)")
    p.add_argument("--save-png", action="store_true", help="also write DIR/images/{i:06d}.png")
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run, keeping its shards (any ranks and batch size, the same settings); a "
        "finished --eval run scores what metrics.json lacks (another REF, more metrics) from its saved sample "
        "features, or refuses",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the results in --out and start over")
    p.add_argument("--eval", default=None, metavar="REF", help="also score the samples against REF (as fid.py)")
    p.add_argument("--metrics", default=",".join(fid.ADM_METRICS), help=f"--eval: from {','.join(fid.METRICS)}")
    p.add_argument("--no-images", action="store_true", help="--eval: keep features and metrics, no images")
    p.add_argument("--protocol", choices=["adm", "pytorch-fid"], default="adm", help="--eval: Inception input")
    p.add_argument("--inception-weights", default=None, help="--eval: a local pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--dinov2-weights", default=None, help="--eval: a local dinov2_vitl14_pretrain.pth")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
