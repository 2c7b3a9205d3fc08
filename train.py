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
"""
import argparse
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dtr

VAE_SCALE = 0.18215  # Stable Diffusion's latent scale
VAE_FACTOR = 8  # the VAE's spatial downsampling

PAPER = dict(model="DiT-L/2", image_size=256, global_batch_size=256, lr=1e-4, ema_decay=0.9999, steps=400_000,
             log_every=100, ckpt_every=50_000, sample_every=0, num_workers=4)
PIXEL_DIT_MAX = 64  # with --data, a DiT on larger images defaults to --vae ema (the paper's latent DiTs)
DEMO = dict(model="DiT-T/2", image_size=16, global_batch_size=64, lr=2e-3, ema_decay=0.995, steps=2400,
            log_every=100, ckpt_every=800, sample_every=0, num_workers=0)
# Arguments that define the model and the diffusion: a resumed run must agree on them (text runs: on TEXT_ARGS too).
MODEL_ARGS = ("model", "image_size", "vae", "num_classes", "learn_sigma", "class_dropout_prob", "routing", "alpha",
              "beta", "routing_seed", "num_timesteps", "noise_schedule", "context_dim")
TEXT_ARGS = ("text_digest", "text_length", "text_mask")
COCO_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # CLIP ViT-L/14's text encoder: 77 tokens of width 768
DEMO_TEXT_ENCODER = "builtin:tiny-clip"  # tiny_clip() below: random, offline, deterministic
MASK_KEY = ".routing._unit_mapping"  # the official DTR code stores each block's masks in its state dict


def write_text(path, text):
    """Write a str to a file (closed before returning, so an atomic_write rename sees all of it)."""
    with open(path, "w") as f:
        f.write(text)


def fail(msg):
    """Stop with one line on stderr and a non-zero exit, named after the running script (sample.py uses our loaders)."""
    raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'train.py'}: error: {msg}")


#################################################################################
#                        Model, diffusion and VAE from arguments                #
#################################################################################

def latent_size(args):
    """Side of the network's input: the image side, or the VAE latent side."""
    return args.image_size // VAE_FACTOR if args.vae else args.image_size


def build_model(args):
    """The model that `args` (a training run's arguments) describe; text-to-image when args.context_dim is set."""
    context_dim = getattr(args, "context_dim", None)
    if context_dim is not None and args.model not in dtr.DiT_models:
        fail(f"text-to-image needs a DiT model, not {args.model}")
    conditional = args.num_classes > 1 or context_dim is not None
    return dtr.create_model(
        args.model, input_size=latent_size(args), in_channels=4 if args.vae else 3, num_classes=args.num_classes,
        learn_sigma=args.learn_sigma, class_dropout_prob=args.class_dropout_prob if conditional else 0.0,
        routing=args.routing, alpha=args.alpha, beta=args.beta, num_tasks=args.num_timesteps,
        routing_seed=args.routing_seed, use_checkpoint=getattr(args, "grad_ckpt", False),
        **({} if context_dim is None else {"context_dim": context_dim}))


def build_diffusion(args, respacing=""):
    """The diffusion `args` describe, respaced to `respacing` ('' = all T steps, for training)."""
    weight = args.loss_weight if args.loss_weight in ("min-snr", "p2") else "constant"  # ANT-UW weighs clusters later
    return dtr.create_diffusion(respacing, noise_schedule=args.noise_schedule, learn_sigma=args.learn_sigma,
                                diffusion_steps=args.num_timesteps, loss_weight=weight,
                                min_snr_gamma=args.min_snr_gamma, p2_gamma=args.p2_gamma, p2_k=args.p2_k)


def size_multiple(model):
    """What the network's input side must be a multiple of: DiT's patch size, or the UNet's total downsampling."""
    if isinstance(model, dtr.DiT):
        return model.patch_size
    return 2 ** sum(isinstance(m, dtr.Downsample) or isinstance(m, dtr.ResBlock) and m.updown == "down"
                    for m in model.modules())


def load_vae(kind, path=None, device="cpu"):
    """Stable Diffusion's AutoencoderKL (sd-vae-ft-ema / -mse), from a local path or the hub; diffusers is optional."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        fail("--vae needs the optional package diffusers: pip install diffusers")
    if path is not None and not os.path.isdir(path):
        fail(f"cannot load the VAE from {path!r}: not a directory (an AutoencoderKL saved with save_pretrained)")
    source = path or f"stabilityai/sd-vae-ft-{kind}"
    try:
        return AutoencoderKL.from_pretrained(source).to(device).eval().requires_grad_(False)
    except Exception as e:  # offline, missing or broken files
        fail(f"cannot load the VAE from {source!r} ({type(e).__name__}); pass --vae-path DIR with a local copy")


#################################################################################
#                                      Data                                     #
#################################################################################

SHAPES = ("red circle", "green square", "blue triangle", "yellow ring", "magenta cross", "cyan diamond")
SHAPE_COLORS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (210, 50, 200), (40, 200, 210))
SHAPE_CAPTIONS = tuple((f"a {s}", f"a picture of a {s}") for s in SHAPES)  # --text-demo: two captions per shape


def make_shapes(num_per_class, image_size, seed=0):
    """Built-in demo data: uint8 images (N, 3, S, S) of one coloured shape per class, and labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    n = num_per_class * len(SHAPES)
    labels = torch.arange(len(SHAPES)).repeat_interleave(num_per_class)
    grid = (torch.arange(image_size) + 0.5) / image_size
    center = 0.4 + 0.2 * torch.rand(n, 2, 1, 1, generator=g)  # (N, 2, 1, 1): x, y
    r = 0.3 + 0.08 * torch.rand(n, 1, 1, generator=g)  # (N, 1, 1): shapes fill most of the frame, never leave it
    dx, dy = grid[None, None, :] - center[:, 0], grid[None, :, None] - center[:, 1]  # (N, S, S)
    dist = (dx**2 + dy**2).sqrt()
    inside = torch.stack([
        dist <= r,  # circle
        torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r,  # square
        (dy <= 0.7 * r) & (dx.abs() <= 0.6 * (dy + r)),  # triangle, apex up
        (dist <= r) & (dist >= 0.55 * r),  # ring
        ((dx.abs() <= 0.3 * r) & (dy.abs() <= r)) | ((dy.abs() <= 0.3 * r) & (dx.abs() <= r)),  # cross
        dx.abs() + dy.abs() <= r,  # diamond
    ])[labels, torch.arange(n)]  # (N, S, S)
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
    return torch.from_numpy(arr[top:top + size, left:left + size].copy()).permute(2, 0, 1)  # (3, S, S) uint8


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
            try:
                with Image.open(path) as im:
                    return center_crop(im.convert("RGB"), self.size), label
            except Exception as e:
                raise ValueError(f"cannot read image {path}: {e}") from None
        img = np.asarray(self.images[i])  # (H, W, 3)
        if img.shape[:2] != (self.size, self.size):
            return center_crop(Image.fromarray(img), self.size), int(self.labels[i])
        return torch.from_numpy(img.copy()).permute(2, 0, 1), int(self.labels[i])


def load_data(args):
    """(dataset, num_classes) for --data: None (built-in shapes), an image folder, an ADM-style .npz or an .npy."""
    if args.data is None:
        images, labels = make_shapes(args.demo_images_per_class, args.image_size, args.seed)
        data = ImageData(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), size=args.image_size)
        return data, 1 if args.unconditional else len(SHAPES)
    if not os.path.exists(args.data):
        fail(f"--data {args.data} does not exist")
    if args.data.endswith((".npz", ".npy")):
        return load_npz(args)
    from torchvision.datasets import ImageFolder
    try:
        folder = ImageFolder(args.data)
    except (FileNotFoundError, OSError) as e:
        fail(f"no images found in {args.data} ({e})")
    classes = 1 if args.unconditional or len(folder.classes) == 1 else len(folder.classes)
    files = folder.samples if classes > 1 else [(p, 0) for p, _ in folder.samples]
    return ImageData(files=files, size=args.image_size), classes


NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def memmap_npz(path, name):
    """Member `name` of an uncompressed .npz, memory-mapped (np.load's mmap_mode has no effect on an .npz)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        stored = path[:-len(".npz")] + "-stored.npz"
        fail(f"{path} is compressed (np.savez_compressed) and cannot be memory-mapped; store it uncompressed once: "
             f"python -c \"import numpy as np; np.savez('{stored}', **np.load('{path}'))\"")
    with open(path, "rb") as f:
        f.seek(info.header_offset)  # the member's local header: 30 bytes, its name, an extra field, then the .npy
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"no local zip header for {name}.npy")
        name_len, extra_len = (int.from_bytes(local[i:i + 2], "little") for i in (26, 28))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = NPY_HEADERS[np.lib.format.read_magic(f)](f)
        offset = f.tell()
    if math.prod(shape) == 0:  # mmap cannot map zero bytes
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def load_npz(args):
    """An ADM-style .npz (arr_0 uint8 (N, H, W, 3), optional arr_1 integer labels (N,)), or a .npy of images only.

    The images are memory-mapped: ranks and loader workers share the page cache instead of each holding a copy."""
    try:
        if args.data.endswith(".npy"):
            images, labels = np.load(args.data, mmap_mode="r"), None
        else:
            with np.load(args.data) as z:
                labels = z["arr_1"] if "arr_1" in z.files else None
            images = memmap_npz(args.data, "arr_0")
    except Exception as e:
        fail(f"cannot read {args.data} as an .npz with arr_0 or an .npy ({type(e).__name__}: {e})")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        fail(f"{args.data}: arr_0 must be non-empty uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels is None or args.unconditional:
        return ImageData(images, np.zeros(len(images), dtype=np.int64), size=args.image_size), 1
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        fail(f"{args.data}: arr_1 must hold one non-negative integer label per image, got {labels.dtype} {labels.shape}")
    return ImageData(images, labels, size=args.image_size), int(labels.max()) + 1


def read_coco_captions(path):
    """[(file_name, [captions])] from a COCO captions_*.json, in the order of its images (those without captions left
    out); ValueError with a one-line reason for anything else."""
    try:
        with open(path) as f:
            coco = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read captions {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not (isinstance(coco, dict) and isinstance(coco.get("images"), list) and isinstance(coco.get("annotations"), list)):
        raise ValueError(f"{path} is not a COCO captions file: it needs lists 'images' and 'annotations'")
    names, captions = {}, {}
    for j, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise ValueError(f"{path}: images[{j}] needs an 'id' and a 'file_name'")
        if image["id"] in names:
            raise ValueError(f"{path}: images[{j}] repeats image id {image['id']!r}")
        names[image["id"]] = image["file_name"]
    for j, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise ValueError(f"{path}: annotations[{j}] needs an 'image_id' and a 'caption' string")
        if ann["image_id"] not in names:
            raise ValueError(f"{path}: annotations[{j}] names image {ann['image_id']!r}, which is not among the images")
        caption = " ".join(ann["caption"].split())  # COCO captions carry stray spaces and newlines
        if not caption:
            raise ValueError(f"{path}: annotations[{j}] has an empty caption")
        captions.setdefault(ann["image_id"], []).append(caption)
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return [(name, captions[i]) for i, name in names.items() if i in captions]


def load_text_data(args):
    """(dataset of (image, index), the captions of every image) for --text-demo or --data DIR --captions JSON."""
    if args.captions is None:  # the demo: every shape gets the captions of its class
        images, labels = make_shapes(args.demo_images_per_class, args.image_size, args.seed)
        data = ImageData(images.permute(0, 2, 3, 1).numpy(), np.arange(len(labels)), size=args.image_size)
        return data, [SHAPE_CAPTIONS[k] for k in labels.tolist()]
    if args.data is None or not os.path.isdir(args.data):
        fail(f"--captions needs --data DIR, the folder of the images it names (got {args.data})")
    try:
        entries = read_coco_captions(args.captions)
    except ValueError as e:
        fail(str(e))
    missing = [name for name, _ in entries if not os.path.isfile(os.path.join(args.data, name))]
    if missing:
        fail(f"{len(missing)} of the {len(entries)} images of {args.captions} are not in {args.data} (e.g. {missing[0]})")
    files = [(os.path.join(args.data, name), i) for i, (name, _) in enumerate(entries)]  # label: the image's index
    return ImageData(files=files, size=args.image_size), [c for _, c in entries]


def pick_captions(captions, index, u):
    """Caption of each image index (N,): one of its captions, chosen by a uniform draw u (N,) in [0, 1)."""
    return [captions[i][int(v * len(captions[i]))] for i, v in zip(index.tolist(), u.tolist())]


class StepBatches(torch.utils.data.Sampler):
    """This rank's indices of every global batch from `start` on; epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, size, global_batch, rank, world, seed, start):
        self.size, self.global_batch, self.rank, self.world, self.seed, self.start = size, global_batch, rank, world, seed, start

    def __iter__(self):
        per_epoch, local = self.size // self.global_batch, self.global_batch // self.world
        epoch, perm = None, None
        for step in range(self.start, 2**62):
            e, i = divmod(step, per_epoch)
            if e != epoch:  # drop_last: a global batch never spans two epochs
                epoch, perm = e, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 2**20 + e))
            batch = perm[i * self.global_batch:(i + 1) * self.global_batch]
            yield batch[self.rank * local:(self.rank + 1) * local].tolist()


def to_uint8(x):
    """Images in [-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), quantised as clamp(127.5 x + 128, 0, 255) like DiT."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(model, diffusion, labels, seeds, cfg_scale=1.0, vae=None, device="cpu", sampler="ddpm", eta=0.0,
             progress=False, context_mask=None):
    """uint8 images (N, H, W, 3): sample i depends only on seeds[i] (and labels[i]), never on the batch it is in.

    labels: class labels (N,), text tokens (N, L, C) (with an optional key mask context_mask (N, L)), or None."""
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    shape = (len(seeds), model.in_channels, model.input_size, model.input_size)
    cond = {"y": None if labels is None else torch.as_tensor(labels, device=device)}
    if context_mask is not None:
        cond["context_mask"] = torch.as_tensor(context_mask, device=device)
    net = model
    if labels is not None and cfg_scale != 1.0:  # classifier-free guidance: [cond | uncond] as one batch, in which
        def net(x, t, **cond):  # the model drops the second half's condition itself (null class or null context)
            both = {k: torch.cat([v, v]) for k, v in cond.items()}
            return model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), cfg_scale=cfg_scale, **both)[: len(x)]
    x = diffusion.p_sample_loop(net, shape, model_kwargs=cond, device=device, progress=progress, generators=gens,
                                sampler=sampler, eta=eta, clip_denoised=vae is None)  # pixels: clip x0 as ADM does
    if vae is not None:
        x = vae.decode(x / VAE_SCALE).sample
    return to_uint8(x)


#################################################################################
#                     Text conditioning: a frozen CLIP text encoder             #
#################################################################################

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
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tokenizer, CLIPTextModel(config)


def load_clip(name):
    """(tokenizer, model) of a CLIP text encoder: a save_pretrained directory, a hub name, or DEMO_TEXT_ENCODER."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        fail("text-to-image needs the optional package transformers: pip install transformers")
    if name == DEMO_TEXT_ENCODER:
        return tiny_clip()
    try:
        return CLIPTokenizer.from_pretrained(name), CLIPTextModel.from_pretrained(name)
    except Exception as e:  # offline, missing or broken files
        fail(f"cannot load a CLIP text encoder from {name!r} ({type(e).__name__}); pass --text-encoder DIR, "
             f"a local copy (tokenizer and CLIPTextModel saved with save_pretrained)")


def text_digest(tokenizer, model, length):
    """A short hash of the tokenizer's vocabulary, the sequence length and every weight: the encoder's identity."""
    h = hashlib.sha256(json.dumps([tokenizer.get_vocab(), length], sort_keys=True).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TextEncoder:
    """Captions -> (token embeddings (N, L, C) float32, key mask (N, L) bool): CLIP's frozen last hidden state.

    Captions are padded (or cut) to the encoder's full length L (77 for CLIP), so a caption's tokens never depend on
    the others in its batch; the mask marks the real tokens (start, words, end) for models trained with --text-mask.
    With a cache folder, each caption's embedding is written there once (atomically) and read back afterwards."""

    def __init__(self, name, device="cpu", cache=None):
        self.tokenizer, model = load_clip(name)
        self.model = model.to(device).eval().requires_grad_(False)
        self.length = min(self.tokenizer.model_max_length, model.config.max_position_embeddings)
        self.dim, self.device, self.cache = model.config.hidden_size, device, cache
        self.digest = text_digest(self.tokenizer, model, self.length)

    @torch.no_grad()
    def encode(self, captions):
        """Run the encoder on a list of captions."""
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.length, truncation=True,
                                return_tensors="pt")
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
                dtr.atomic_write(self.cache_file(c), lambda tmp: torch.save(entry, tmp))
        for c in captions:
            if c not in found:
                found[c] = torch.load(self.cache_file(c), map_location="cpu", weights_only=True)
        hidden = torch.stack([found[c]["hidden"] for c in captions]).to(self.device)
        return hidden, torch.stack([found[c]["mask"] for c in captions]).to(self.device)


#################################################################################
#            Latent cache: every image and its flip through the VAE once        #
#################################################################################

CACHE_FORMAT = 1  # version of the layout below
CACHE_PREPROCESSING = "adm-center-crop"  # center_crop() above: rename this when it changes, so old caches are refused
ENCODE_BATCH = 32  # images per VAE call while building a cache (64 with their flips)
OPEN_SHARDS = 64  # memory maps a LatentData keeps open (each holds a file descriptor)


def vae_digest(vae):
    """A short hash of every VAE weight: which encoder made a cache (a copy of the same weights elsewhere matches)."""
    h = hashlib.sha256()
    for k, v in vae.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
    side, channels, flips = args.image_size // VAE_FACTOR, vae.config.latent_channels, args.flip_prob > 0
    return {"format": CACHE_FORMAT,
            "vae": {"kind": args.vae, "path": args.vae_path, "digest": vae_digest(vae), "latent_channels": channels},
            "image_size": args.image_size, "preprocessing": CACHE_PREPROCESSING, "flips": flips,
            "source": {"path": args.data, **source_record(dataset, args.data)},
            "layout": "shard_NNNNN.npy: (images, F, 2, C, h, w); F: the image, then its flip; 2: posterior mean, std",
            "dtype": "float32", "shape": [1 + flips, 2, channels, side, side],
            "shard_size": args.latent_shard_size, "num_shards": math.ceil(len(dataset) / args.latent_shard_size)}


def check_record(found, want, args):
    """Stop with one line where the cache's record `found` disagrees with this run's `want`."""
    cache, data = f"--latents {args.latents}", args.data or "the built-in shapes"
    fix = f"pass a new --latents DIR (or delete {args.latents}) to encode anew"
    if found.get("format") != CACHE_FORMAT:
        fail(f"{cache} has cache format {found.get('format')!r}, this train.py reads {CACHE_FORMAT}: {fix}")
    vae = found["vae"]
    if vae["digest"] != want["vae"]["digest"]:
        path = f" --vae-path {vae['path']}" if vae["path"] else ""
        fail(f"{cache} holds latents of another VAE (--vae {vae['kind']}{path}, weights {vae['digest']}; this one's "
             f"are {want['vae']['digest']}): pass that VAE, or {fix}")
    if found["image_size"] != want["image_size"]:
        fail(f"{cache} holds {found['image_size']} px images, not --image-size {want['image_size']}: "
             f"pass --image-size {found['image_size']}, or {fix}")
    if found["preprocessing"] != want["preprocessing"]:
        fail(f"{cache} was made with preprocessing {found['preprocessing']!r}, this train.py does "
             f"{want['preprocessing']!r}: {fix}")
    if want["flips"] and not found["flips"]:
        fail(f"{cache} was built without flips but --flip-prob is {args.flip_prob}: pass --flip-prob 0, or {fix}")
    if found["source"]["count"] != want["source"]["count"]:
        fail(f"{data} holds {want['source']['count']:,} images but {cache} was built from "
             f"{found['source']['count']:,}: the source changed since; {fix}")
    if found["source"]["digest"] != want["source"]["digest"]:
        fail(f"the images of {data} are not those {cache} was built from (other names or contents): {fix}")


def shard_file(directory, k):
    return os.path.join(directory, f"shard_{k:05d}.npy")


def shard_problem(path, shape):
    """Why the file at `path` is not a complete float32 .npy of `shape` (truncated, corrupt, other), or None."""
    try:
        with open(path, "rb") as f:
            found, fortran, dtype = NPY_HEADERS[np.lib.format.read_magic(f)](f)
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
            fail(f"no space left on the device while writing {path} (the finished shards are kept): free some, or "
                 f"pass --latents a folder on a larger disk; re-running continues where it stopped")
        fail(f"cannot write {path} ({e.strerror or e})")


@torch.no_grad()
def encode_moments(vae, x, flips):
    """uint8 images (N, 3, S, S) -> posterior mean and std (N, F, 2, C, h, w), of each image (and of its flip)."""
    x = x.float() / 127.5 - 1  # as the training loop scales, then flips, them
    post = vae.encode(torch.cat([x, x.flip(3)]) if flips else x).latent_dist
    moments = torch.stack([post.mean, post.std], 1)  # (F * N, 2, C, h, w)
    return moments.unflatten(0, (1 + flips, len(x))).transpose(0, 1).float().cpu()


def build_latents(args, dataset, vae, record, missing, rank, world, device):
    """Encode the shards in `missing` (each rank its share) and write cache.json last, when every shard is whole."""
    from tqdm.auto import tqdm
    directory, size, shape = args.latents, record["shard_size"], record["shape"]
    bounds = {k: range(k * size, min((k + 1) * size, len(dataset))) for k in range(record["num_shards"])}
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        for tmp in glob.glob(os.path.join(directory, ".shard_*.tmp*")):  # left by a killed run (kill -9 skips clean-up)
            os.remove(tmp)
        partial = os.path.join(directory, "cache.partial.json")  # the record, until every shard is there
        if not os.path.exists(partial):
            dtr.atomic_write(partial, lambda tmp: write_text(tmp, json.dumps(record, indent=2)))
        need = sum(len(bounds[k]) for k in missing) * math.prod(shape) * 4
        free = shutil.disk_usage(directory).free
        if need > free:
            fail(f"--latents {directory} needs {need / 1e9:.2f} GB more but its disk has {free / 1e9:.2f} GB free: "
                 f"free some, or pass a folder on a larger disk")
    if world > 1:
        dist.barrier()
    mine = missing[rank::world]
    batches = [list(bounds[k][i:i + ENCODE_BATCH]) for k in mine for i in range(0, len(bounds[k]), ENCODE_BATCH)]
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers))
    bar = tqdm(total=sum(len(bounds[k]) for k in mine), disable=rank != 0, dynamic_ncols=True, unit="img",
               desc=f"encoding {len(mine)} of the {len(missing)} missing shard(s) into {directory}")
    try:
        for k in mine:
            parts = []
            for _ in range(math.ceil(len(bounds[k]) / ENCODE_BATCH)):
                try:
                    x, _ = next(loader)
                except Exception as e:  # unreadable images, also from loader workers: one line
                    fail(str(e).strip().splitlines()[-1])
                parts.append(encode_moments(vae, x.to(device), record["flips"]))
                bar.update(len(x))
            write_shard(shard_file(directory, k), torch.cat(parts).numpy())
    finally:
        bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        for k, images in bounds.items():
            problem = shard_problem(shard_file(directory, k), (len(images), *shape))
            if problem:
                fail(f"--latents {directory}: {shard_file(directory, k)} is missing or bad after encoding ({problem})")
        done = os.path.join(directory, "cache.json")  # last: its presence says the cache is complete
        dtr.atomic_write(done, lambda tmp: write_text(tmp, json.dumps(record, indent=2)))
        os.remove(partial)
    if world > 1:
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
        fail(f"cannot read {path} ({problem}): pass a new --latents DIR (or delete its folder) to encode anew")
    return record


def prepare_latents(args, dataset, vae, rank, world, device):
    """The cache in --latents as a LatentData: checked against this run, and first built or completed if need be."""
    if os.path.exists(args.latents) and not os.path.isdir(args.latents):
        fail(f"--latents {args.latents} is a file; it needs a folder (new, or one it wrote before)")
    want = cache_record(args, dataset, vae)
    records = [os.path.join(args.latents, name) for name in ("cache.json", "cache.partial.json")]
    found = next((read_record(p) for p in records if os.path.exists(p)), None)
    if found is not None:
        check_record(found, want, args)
    elif glob.glob(os.path.join(args.latents, "shard_*.npy")):  # a build writes its record before any shard
        fail(f"--latents {args.latents} holds shards but no cache.json: nothing says how they were made; pass a new "
             f"--latents DIR (or delete that folder) to encode anew")
    record = found or want  # an existing cache keeps its layout (e.g. its flips when this run does not flip)
    size, shape = record["shard_size"], record["shape"]
    counts = [min(size, len(dataset) - k * size) for k in range(record["num_shards"])]
    present = [k for k in range(len(counts)) if os.path.exists(shard_file(args.latents, k))]
    bad = [(k, why) for k in present if (why := shard_problem(shard_file(args.latents, k), (counts[k], *shape)))]
    if bad:
        k, why = bad[0]
        fail(f"{shard_file(args.latents, k)} is truncated or corrupt ({why}; {len(bad)} bad shard(s) in all): "
             f"delete the bad shards and re-run with the same flags to encode them again")
    missing = sorted(set(range(len(counts))) - set(present))
    if missing or not os.path.exists(records[0]):
        build_latents(args, dataset, vae, record, missing, rank, world, device)
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
            self.maps[k] = np.load(shard_file(self.directory, k), mmap_mode="r")
        self.maps.move_to_end(k)
        return self.maps[k]

    def __getitem__(self, i):
        k, j = divmod(i, self.shard_size)
        return torch.from_numpy(np.array(self.shard(k)[j])), int(self.labels[i])


def cached_latents(moments, draws):
    """Latents (N, C, h, w) from cached moments (N, F, 2, C, h, w), as the loop encodes on the fly: the flipped
    entry for a flipped image, z = (mean + std * eps) * 0.18215 with this step's posterior draw eps."""
    m = torch.where(draws["flip"][:, None, None, None, None], moments[:, -1], moments[:, 0])  # (N, 2, C, h, w)
    return (m[:, 0] + m[:, 1] * draws["posterior"]) * VAE_SCALE


SD_VAE_CONFIG = dict(  # Stable Diffusion's AutoencoderKL (sd-vae-ft-ema / -mse share it): for benchmarks, offline
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=256)


def bench_latents(vae_path=None, model="DiT-B/2", image_size=256, batch_size=4, rounds=5, seed=0):
    """Median seconds per training step encoding on the fly vs reading a --latents cache, interleaved; printed.

    vae_path=None builds Stable Diffusion's VAE architecture (SD_VAE_CONFIG) with random weights, offline: the encoder
    costs the same with any weights. A step is the loop's: batch, latents, loss, backward, AdamW, EMA. Round 0 warms
    up; the order of the two paths alternates every round, so drift (other jobs on the machine) hits both alike."""
    import statistics
    import tempfile
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if vae_path is None:
            from diffusers.models import AutoencoderKL
            vae_path = os.path.join(tmp, "vae")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(vae_path)
        data = os.path.join(tmp, "images.npz")
        np.savez(data, np.random.default_rng(seed).integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8))
        args = resolve_preset(parser().parse_args([
            "--data", data, "--model", model, "--image-size", str(image_size), "--vae", "ema", "--vae-path", vae_path,
            "--global-batch-size", str(batch_size), "--num-workers", "0", "--latents", os.path.join(tmp, "latents")]))
        images, args.num_classes = load_data(args)  # unconditional: no labels in the .npz
        vae = load_vae(args.vae, args.vae_path, device)
        start = time.perf_counter()
        latents = prepare_latents(args, images, vae, 0, 1, device)
        encode_once = time.perf_counter() - start
        model = build_model(args)
        ema, diffusion = deepcopy(model).requires_grad_(False), build_diffusion(args)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, foreach=True)
        shape = (model.in_channels, latent_size(args), latent_size(args))

        def step(source, i):
            start = time.perf_counter()
            r = step_randomness(args, i, shape, device)
            x, _ = torch.utils.data.default_collate([source[j] for j in range(batch_size)])
            if source is latents:
                x = cached_latents(x, r)
            else:  # as train()'s loop
                x = x.float() / 127.5 - 1
                x = torch.where(r["flip"][:, None, None, None], x.flip(3), x)
                with torch.no_grad():
                    post = vae.encode(x).latent_dist
                    x = (post.mean + post.std * r["posterior"]) * VAE_SCALE
            loss = diffusion.training_losses(model, x, r["t"], {}, r["noise"])["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, model, args.ema_decay)
            return time.perf_counter() - start

        times = {"on the fly": [], "cache": []}
        for i in range(1 + rounds):
            for name in (("on the fly", "cache") if i % 2 else ("cache", "on the fly")):
                seconds = step(latents if name == "cache" else images, i)
                if i:
                    times[name].append(seconds)
    result = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} {image_size} px, batch {batch_size}, {torch.get_num_threads()} threads, median of {rounds} "
          f"interleaved rounds: on the fly {result['on the fly']:.3f} s/step, from the cache {result['cache']:.3f} "
          f"s/step ({result['on the fly'] / result['cache']:.2f}x); building the cache ({batch_size} images and their "
          f"flips): {encode_once:.1f} s")
    for k, v in times.items():
        print(f"  {k}: {' '.join(f'{t:.2f}' for t in v)} s")
    return result


#################################################################################
#                           Distributed set-up and checkpoints                  #
#################################################################################

def setup_distributed(timeout=None):
    """(rank, world_size, device) from the torchrun environment; one process without it. timeout: of collectives."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ["LOCAL_RANK"])  # the device follows the local rank, never the global one
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **({} if timeout is None else {"timeout": timeout}))
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_mean(x, world):
    """Mean of a tensor over ranks (a no-op on one process)."""
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def rng_states(world, device):
    """Every rank's global RNG states (they drive dropout), gathered for the checkpoint."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def unwrap_state_dict(sd):
    """A model state dict without the prefixes DDP (module.) and torch.compile (_orig_mod.) add to its keys."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def clean_state_dict(sd):
    """A model state dict, unwrapped and without the official DTR repo's mask buffers.

    The masks are dropped unchecked: --init-from takes weights only, and routing comes from this run's flags (one may
    fine-tune a plain DiT with DTR, or change alpha); sample.py, which must reproduce a model, checks them instead."""
    return {k: v for k, v in unwrap_state_dict(sd).items() if not k.endswith(MASK_KEY)}


def load_checkpoint(path):
    """torch.load with a one-line error for missing or corrupt files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot load checkpoint {path} ({type(e).__name__})")


def latest_checkpoint(results_dir):
    """The newest checkpoint of the newest experiment under results_dir (None if there is none)."""
    found = sorted(glob.glob(os.path.join(results_dir, "*", "checkpoints", "*.pt")))
    return found[-1] if found else None


def new_experiment_dir(args):
    """results/NNN-model-routing, never reusing an existing directory."""
    os.makedirs(args.results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(args.results_dir, "*")))
    while True:
        path = os.path.join(args.results_dir, f"{index:03d}-{args.model.replace('/', '-')}-{args.routing}")
        try:
            os.makedirs(os.path.join(path, "checkpoints"))
            return path
        except FileExistsError:
            index += 1


#################################################################################
#                                  Training loop                                #
#################################################################################

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def step_randomness(args, step, shape, device):
    """All random draws of one global batch, from a generator seeded by (seed, step); each rank slices its share.

    Drawing per global batch rather than per rank makes training independent of how the batch is split over
    ranks: any world size sees the same timesteps, noise, flips, label drops and captions for global sample i."""
    g = torch.Generator(device).manual_seed(args.seed * 2**32 + step)
    n = args.global_batch_size
    clusters = args.uw_clusters if args.loss_weight == "ant-uw" else None
    draws = dict(t=dtr.sample_timesteps(n, args.num_timesteps, clusters, device, g),
                 noise=torch.randn(n, *shape, generator=g, device=device),
                 flip=torch.rand(n, generator=g, device=device) < args.flip_prob,
                 drop=torch.rand(n, generator=g, device=device) < args.class_dropout_prob)
    if args.vae:
        draws["posterior"] = torch.randn(n, *shape, generator=g, device=device)  # z = mean + std * noise
    if getattr(args, "context_dim", None) is not None:  # which of its captions each image gets this time
        draws["caption"] = torch.rand(n, generator=g, device=device, dtype=torch.float64)
    return draws


def train(args):
    """Train, log and checkpoint as `args` say; returns the experiment directory."""
    rank, world, device = setup_distributed()
    if args.global_batch_size % world:
        fail(f"global batch size {args.global_batch_size} is not divisible by the world size {world}")
    local_batch = args.global_batch_size // world
    if args.loss_weight == "ant-uw" and local_batch % args.uw_clusters:
        fail(f"per-rank batch {local_batch} is not divisible by the {args.uw_clusters} ANT-UW timestep clusters")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed * world + rank)  # per-rank stream for dropout; batch draws are per step

    text, captions, args.context_dim, args.text_digest, args.text_length = None, None, None, None, None
    if args.text_encoder is None:
        dataset, args.num_classes = load_data(args)
    else:  # text-to-image: the condition is a caption, through the frozen encoder
        (dataset, captions), args.num_classes = load_text_data(args), 1
        text = TextEncoder(args.text_encoder, device, args.cache_text)
        args.context_dim, args.text_digest, args.text_length = text.dim, text.digest, text.length
    if len(dataset) < args.global_batch_size:
        fail(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    ckpt = None
    if args.resume:
        path = latest_checkpoint(args.results_dir) if args.resume == "auto" else args.resume
        ckpt = load_checkpoint(path) if path else None
        if ckpt is not None:
            args.resume = path
            for k in MODEL_ARGS + (TEXT_ARGS if text else ()):
                if ckpt["args"].get(k) != getattr(args, k):
                    fail(f"--resume {path}: {k} is {ckpt['args'].get(k)!r} there but {getattr(args, k)!r} now")
    if args.vae and args.image_size % VAE_FACTOR:
        fail(f"--image-size {args.image_size} is not divisible by the VAE factor {VAE_FACTOR}")

    model = build_model(args).to(device)
    multiple = size_multiple(model)
    if latent_size(args) % multiple:
        fail(f"input side {latent_size(args)} is not divisible by {multiple}, which {args.model} needs")
    if args.init_from:
        sd = load_checkpoint(args.init_from)
        sd = sd.get("ema", sd.get("model", sd)) if isinstance(sd, dict) and ("ema" in sd or "model" in sd) else sd
        try:
            model.load_state_dict(clean_state_dict(sd), strict=True)
        except RuntimeError as e:
            fail(f"--init-from {args.init_from} does not match {args.model}: {str(e).splitlines()[1].strip()}")
    ema = deepcopy(model).requires_grad_(False)  # EMA starts from the model
    uw = torch.nn.Parameter(torch.zeros(args.uw_clusters, device=device)) if args.loss_weight == "ant-uw" else None
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if uw is not None:  # ANT-UW log-variances s_k: their own group, lr 0.025 and no weight decay
        groups.append({"params": [uw], "lr": args.uw_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if uw is not None:
            uw.data.copy_(ckpt["uw"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    diffusion = build_diffusion(args)
    vae = load_vae(args.vae, args.vae_path, device) if args.vae else None
    latents = prepare_latents(args, dataset, vae, rank, world, device) if args.latents else None
    dataset = dataset if latents is None else latents  # from the cache: no image is read, no encoder runs

    exp = os.path.dirname(os.path.dirname(args.resume)) if ckpt is not None else (new_experiment_dir(args) if rank == 0 else None)
    log = Logger(exp if rank == 0 else None)
    if rank == 0 and ckpt is None:
        dtr.atomic_write(os.path.join(exp, "args.json"), lambda tmp: write_text(tmp, json.dumps(vars(args), indent=2)))
    condition = f"{args.num_classes} classes"
    if text is not None:
        condition = f"{sum(map(len, captions)):,} captions, text encoder {args.text_encoder} ({text.length} x {text.dim})"
    log(f"{'resuming ' + args.resume + ' at step ' + str(step) if ckpt else 'experiment ' + str(exp)}: {args.model}, "
        f"routing {args.routing} (alpha {args.alpha}, beta {args.beta}), {len(dataset):,} images, "
        f"{condition}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{world} process(es) x batch {local_batch} on {device}")

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(len(dataset), args.global_batch_size, rank, world, args.seed, step),
        num_workers=args.num_workers, pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    amp = dict(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision),
               enabled=args.precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    shape = (model.in_channels, latent_size(args), latent_size(args))
    part = slice(rank * local_batch, (rank + 1) * local_batch)
    stats = torch.zeros(2, 4, device=device)  # loss sum and sample count per timestep quarter
    model.train()
    batches = iter(loader)
    bar = tqdm_bar(rank, step, args.steps)
    start, start_step = time.perf_counter(), step
    try:
        while step < args.steps:
            try:
                x, y = next(batches)
            except Exception as e:  # unreadable images, also from loader workers: one line
                fail(str(e).strip().splitlines()[-1])
            r = {k: v[part] for k, v in step_randomness(args, step, shape, device).items()}
            if latents is not None:  # x: the cached posterior moments (N, F, 2, C, h, w)
                x = cached_latents(x.to(device, non_blocking=True), r)
            else:
                x = x.to(device, non_blocking=True).float() / 127.5 - 1  # uint8 -> [-1, 1]
                x = torch.where(r["flip"][:, None, None, None], x.flip(3), x)  # random horizontal flip
                if vae is not None:
                    with torch.no_grad():
                        post = vae.encode(x).latent_dist
                        x = (post.mean + post.std * r["posterior"]) * VAE_SCALE
            if text is not None:  # y holds image indices: pick this step's captions and encode them (no grad)
                context, mask = text(pick_captions(captions, y, r["caption"]))
                kwargs = dict(y=context, force_drop_ids=r["drop"], **({"context_mask": mask} if args.text_mask else {}))
            else:
                kwargs = {} if args.num_classes == 1 else dict(y=y.to(device), force_drop_ids=r["drop"])
            with torch.autocast(**amp):
                terms = diffusion.training_losses(net, x, r["t"], kwargs, r["noise"])
            losses = terms["loss"].float()
            loss = losses.mean() if uw is None else dtr.uncertainty_weighted_loss(losses, r["t"], uw, args.num_timesteps)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if uw is not None:  # the log-variances live outside DDP: average their gradients by hand
                all_reduce_mean(uw.grad, world)
            scaler.step(opt)
            scaler.update()
            update_ema(ema, model, args.ema_decay)
            step += 1

            quarter = (r["t"] * 4 // args.num_timesteps).clamp(max=3)
            stats[0].index_add_(0, quarter, losses.detach())
            stats[1].index_add_(0, quarter, torch.ones_like(losses))
            check = all_reduce_mean(loss.detach().reshape(1).clone(), world).item()
            if not math.isfinite(check):
                fail(f"loss is {check} at step {step}; stopped, the last checkpoint in {exp} is the last good one")
            bar.set_postfix(loss=f"{check:.4f}")
            bar.update()
            if step % args.log_every == 0 or step == args.steps:
                log_progress(log, args, step, stats, uw, world, (step - start_step) / (time.perf_counter() - start))
                start, start_step = time.perf_counter(), step
            if step % args.ckpt_every == 0 or step == args.steps:
                path = save_checkpoint(args, exp, step, model, ema, opt, uw, world, device, rank)
                log(f"saved {path}")
            if rank == 0 and (args.sample_every and step % args.sample_every == 0 or step == args.steps):
                path = save_grid(args, exp, step, ema, vae, device, text, captions)
                log(f"saved {path}")
    finally:  # errors then print on a line of their own
        bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return exp


def tqdm_bar(rank, step, total):
    """A progress bar on rank 0, a silent stand-in elsewhere."""
    from tqdm.auto import tqdm
    return tqdm(initial=step, total=total, disable=rank != 0, dynamic_ncols=True, desc="train")


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


def log_progress(log, args, step, stats, uw, world, steps_per_sec):
    """Log speed, the all-reduced loss, the loss per timestep quarter and the ANT-UW weights; reset the sums."""
    totals = all_reduce_mean(stats.clone(), world)
    per_quarter = (totals[0] / totals[1].clamp(min=1)).tolist()
    mean = (totals[0].sum() / totals[1].sum().clamp(min=1)).item()
    msg = (f"step {step:07d}  loss {mean:.4f}  [t quarters {' '.join(f'{q:.4f}' for q in per_quarter)}]  "
           f"{steps_per_sec:.2f} steps/s  {steps_per_sec * args.global_batch_size:.1f} img/s")
    if uw is not None:  # the weight each cluster's loss gets: 0.5 exp(-s_k)
        msg += "  uw " + " ".join(f"{w:.3f}" for w in (0.5 * torch.exp(-uw.detach())).tolist())
    log(msg)
    stats.zero_()


def save_checkpoint(args, exp, step, model, ema, opt, uw, world, device, rank):
    """Everything needed to resume bit-exactly, written atomically by rank 0 (all ranks join the RNG gather)."""
    rng = rng_states(world, device)
    path = os.path.join(exp, "checkpoints", f"{step:07d}.pt") if rank == 0 else None
    if rank == 0:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": vars(args),
                 "step": step, "uw": None if uw is None else uw.detach().cpu(), "rng": rng,
                 "data": {"step": step, "seed": args.seed, "global_batch_size": args.global_batch_size}}
        dtr.atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def save_grid(args, exp, step, ema, vae, device, text=None, captions=None):
    """A grid of EMA samples next to the checkpoints: a row per class (up to 8), or per prompt (text; listed in .txt)."""
    from torchvision.utils import save_image
    path = os.path.join(exp, f"samples_{step:07d}.png")
    rows = min(args.num_classes, 8) if args.num_classes > 1 else 8
    labels = None if args.num_classes == 1 else torch.arange(rows).repeat_interleave(8).tolist()
    mask = None
    if text is not None:  # the first caption of the first images with distinct first captions (demo: one per shape)
        prompts = list(dict.fromkeys(c[0] for c in captions))[:8]
        rows, (labels, mask) = len(prompts), text([p for p in prompts for _ in range(8)])
        mask = mask if args.text_mask else None
        dtr.atomic_write(path[:-4] + ".txt", lambda tmp: write_text(tmp, "\n".join(prompts) + "\n"))
    ema.eval()
    images = generate(ema, build_diffusion(args, str(args.grid_steps)), labels, range(rows * 8),
                      args.grid_cfg_scale if args.class_dropout_prob > 0 else 1.0, vae, device, context_mask=mask)
    grid = images.permute(0, 3, 1, 2).float() / 255
    dtr.atomic_write(path, lambda tmp: save_image(grid, tmp, nrow=8, padding=1, format="png"))
    return path


#################################################################################
#                                   Command line                                #
#################################################################################

def resolve_preset(args):
    """Fill flags left unset from the demo preset (no --data) or the paper's settings (with --data); text encoder."""
    if args.text_demo and (args.data is not None or args.captions is not None):
        fail("--text-demo trains on the built-in shapes; leave out --data and --captions")
    if args.text_demo or args.captions is not None:
        args.text_encoder = args.text_encoder or (DEMO_TEXT_ENCODER if args.text_demo else COCO_TEXT_ENCODER)
    elif args.text_encoder or args.cache_text or args.text_mask:
        fail("--text-encoder, --cache-text and --text-mask apply to text-to-image runs (--captions or --text-demo)")
    preset = DEMO if args.data is None else PAPER
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.vae is None and args.data is not None and args.model in dtr.DiT_models and args.image_size > PIXEL_DIT_MAX:
        args.vae = "ema"  # the paper's DiTs learn Stable Diffusion's latents (256 px: 32x32x4); ADMs learn pixels
    args.vae = None if args.vae == "none" else args.vae
    if args.latents and not args.vae:
        fail("--latents stores VAE latents: it needs --vae ema|mse (a pixel-space run reads its images directly)")
    return args


def main(args):
    return train(resolve_preset(args))


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--data", default=None, help="image folder (ImageFolder), ADM .npz (uncompressed; memory-mapped) or .npy of "
                                    "images; default: built-in coloured shapes")
    a("--image-size", type=int, default=None, help="pixels (demo 16, paper 256)")
    a("--unconditional", action="store_true", help="ignore class labels")
    a("--flip-prob", type=float, default=0.5, help="random horizontal flips")
    a("--demo-images-per-class", type=int, default=500)
    a("--num-workers", type=int, default=None)
    a("--vae", choices=["ema", "mse", "none"], default=None,
      help="train in Stable Diffusion's latent space (needs diffusers), or none: pixels. Default with --data: ema for "
           f"a DiT above {PIXEL_DIT_MAX} px (the paper's setting), else none (ADMs, small images, the demo)")
    a("--vae-path", default=None, help="local AutoencoderKL directory (default: the hub's stabilityai/sd-vae-ft-*)")
    a("--latents", default=None, metavar="DIR",
      help="pre-encoded latents: the VAE posterior's mean and std of every image and of its flip, float32, in DIR; "
           "built first if missing or incomplete (sharded over ranks, resumable), then training reads no image and "
           "runs no encoder. Needs --vae; refused if DIR was made with another VAE, image size, flips or source")
    a("--latent-shard-size", type=int, default=1024, help="images per --latents shard file (64 MiB at 256 px)")
    # text-to-image (needs transformers)
    a("--captions", default=None, help="COCO captions_*.json for the images in --data: text-to-image training")
    a("--text-demo", action="store_true", help="text-to-image on the built-in shapes, captioned 'a red circle', ...")
    a("--text-encoder", default=None, help=f"CLIP text encoder: local directory or hub name (default {COCO_TEXT_ENCODER}; "
                                           f"--text-demo: {DEMO_TEXT_ENCODER}, a tiny random one)")
    a("--cache-text", default=None, metavar="DIR", help="keep every caption's embedding in DIR (encoded once)")
    a("--text-mask", action="store_true", help="cross-attend only to the caption's tokens, not to CLIP's padding")
    # model and routing
    a("--model", choices=list(dtr.MODELS), default=None, help="demo DiT-T/2, paper DiT-L/2")
    a("--routing", choices=dtr.ROUTINGS, default="dtr")
    a("--alpha", type=float, default=4.0)
    a("--beta", type=float, default=0.8)
    a("--routing-seed", type=int, default=0, help="seeds the R-TR masks")
    a("--class-dropout-prob", type=float, default=0.1, help="label (text: caption) dropout for classifier-free guidance")
    a("--fixed-sigma", dest="learn_sigma", action="store_false", help="do not learn the variance")
    # diffusion and loss
    a("--num-timesteps", type=int, default=1000)
    a("--noise-schedule", choices=["linear", "cosine"], default="cosine")
    a("--loss-weight", choices=["constant", "min-snr", "p2", "ant-uw"], default="constant")
    a("--min-snr-gamma", type=float, default=5.0)
    a("--p2-gamma", type=float, default=1.0)
    a("--p2-k", type=float, default=1.0)
    a("--uw-clusters", type=int, default=8, help="ANT-UW timestep clusters K")
    a("--uw-lr", type=float, default=0.025, help="learning rate of the ANT-UW log-variances")
    # optimisation
    a("--global-batch-size", type=int, default=None, help="demo 64, paper 256")
    a("--lr", type=float, default=None, help="demo 2e-3, paper 1e-4")
    a("--weight-decay", type=float, default=0.0)
    a("--ema-decay", type=float, default=None, help="demo 0.995, paper 0.9999")
    a("--steps", type=int, default=None, help="demo 2400, paper 400000")
    a("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-ckpt", action="store_true", help="gradient checkpointing (DiT and ADM blocks): recompute activations in "
                                               "backward, for less memory; the weights and state dict are unchanged")
    a("--seed", type=int, default=0)
    # bookkeeping
    a("--results-dir", default="results")
    a("--log-every", type=int, default=None)
    a("--ckpt-every", type=int, default=None)
    a("--sample-every", type=int, default=None, help="also write a sample grid every N steps (0: only at the end)")
    a("--grid-steps", type=int, default=250, help="DDPM steps for the sample grid")
    a("--grid-cfg-scale", type=float, default=4.0, help="guidance scale for the sample grid")
    a("--resume", default=None, help="checkpoint path, or 'auto' for the newest under --results-dir")
    a("--init-from", default=None, help="load model weights only (e.g. a pretrained DiT / ADM checkpoint)")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
