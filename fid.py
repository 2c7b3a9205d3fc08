"""
FID, sFID, Inception Score, Precision and Recall in PyTorch, with the definitions of openai's
ADM evaluator (guided-diffusion `evaluations/evaluator.py`, TensorFlow) that the DTR paper uses.

    python fid.py REF SAMPLES [--json results.json]     # ADM .npz batches or image folders
    python fid.py --save-stats SRC OUT.npz              # cache statistics + features of SRC

The network is the FID Inception graph of 2015-12-05 with pytorch-fid's weights file; the images
go through ADM's graph preprocessing (TF1 bilinear resize to 299, then (x - 128) / 128).
"""

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.special import log_softmax, logsumexp
from tqdm import tqdm

import dtr

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FEATURE_DIMS = {"pool": 2048, "spatial": 17 * 17 * 7, "logits": 1008}
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # ADM reference batches may carry these
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


InputError = dtr.InputError  # unusable input (file, array or feature set): main() reports it as one line


# -----------------------------------------------------------------------------
# Inception network (FID variant of InceptionV3, torchvision-style names)
# -----------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (TF's eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _chain(x, *layers):
    """Apply layers in order."""
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool(x):
    """3x3 stride-1 average pool that, like TF, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b, 5c, 5d)."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch5x5_1, self.branch5x5_2),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """35 -> 17 grid reduction (Mixed_6a)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                F.max_pool2d(x, 3, 2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b, 6c, 6d, 6e)."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),  # channels 0:192; Mixed_6d's is TF's `mixed_6/conv`
                _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _chain(
                    x,
                    self.branch7x7dbl_1,
                    self.branch7x7dbl_2,
                    self.branch7x7dbl_3,
                    self.branch7x7dbl_4,
                    self.branch7x7dbl_5,
                ),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionD(nn.Module):
    """17 -> 8 grid reduction (Mixed_7a)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                _chain(x, self.branch3x3_1, self.branch3x3_2),
                _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                F.max_pool2d(x, 3, 2),
            ],
            1,
        )


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions (Mixed_7b; Mixed_7c, which max-pools in the FID graph)."""

    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(bd),
                self.branch3x3dbl_3b(bd),
                self.branch_pool(pool),
            ],
            1,
        )


def fastest_layout(device):
    """Memory layout the network runs fastest in: channels_last on CPU, where oneDNN's convolutions take the
    whole network 1.4x faster than on NCHW (README, Speed); NCHW elsewhere (cuDNN's fp32 kernels, not timed)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


class InceptionV3(nn.Module):
    """The FID Inception network; its state dict is that of pytorch-fid's weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # TF's softmax layer; ADM's logits use its weight only

    def forward(self, x):
        """(N, 3, 299, 299) in [-1, 1], any memory layout -> dict of pool (N, 2048), spatial (N, 2023),
        logits (N, 1008)."""
        x = x.contiguous(memory_format=fastest_layout(x.device))  # every later layer keeps this layout
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (N, 64, 147, 147)
        x = _chain(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # (N, 192, 71, 71)
        x = _chain(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)  # (N, 288, 35, 35)
        x = _chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d)  # (N, 768, 17, 17)
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 2023): mixed_6/conv[..., :7] in H, W, C order
        x = _chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # (N, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048): pool_3
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}  # logits (N, 1008)


def load_inception(weights=None, device="cpu"):
    """InceptionV3 in eval mode with the weights file at `weights`, else downloaded via torch.hub's cache."""
    model = InceptionV3()
    if weights is None:
        try:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu")
        except Exception as e:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise InputError(
                f"cannot download the Inception weights ({e}); download {FID_WEIGHTS_URL} "
                f"into {cache} or pass --inception-weights PATH"
            ) from None
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"cannot read Inception weights {weights}: {e}") from None
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise InputError(
            f"{weights or FID_WEIGHTS_URL} is not the FID Inception state dict: {str(e).splitlines()[0]}"
        ) from None
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# Preprocessing (ADM's TF graph: ResizeBilinear to 299, then (x - 128) / 128)
# -----------------------------------------------------------------------------


def _tf1_taps(n_in, n_out, device):
    """Source rows of TF1's legacy resize: src = dst * (in / out) in float32, floor, clamp, lerp weight."""
    src = torch.arange(n_out, dtype=torch.float32) * (torch.tensor(n_in, dtype=torch.float32) / n_out)
    lo = src.floor()
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo.long().to(device), hi.long().to(device), (src - lo).to(device)


def tf1_resize_bilinear(x, size):
    """TF1 `resize_bilinear` (align_corners=False, no half-pixel centres) of float (N, C, H, W) to `size`."""
    y0, y1, wy = _tf1_taps(x.shape[-2], size[0], x.device)
    x0, x1, wx = _tf1_taps(x.shape[-1], size[1], x.device)
    top, bottom = x[..., y0, :], x[..., y1, :]  # (N, C, out_h, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx  # (N, C, out_h, out_w)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess(images, protocol="adm"):
    """uint8 (N, H, W, 3) -> float32 (N, 3, 299, 299) network input, as ADM's graph or as pytorch-fid."""
    x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
    if protocol == "adm":
        return (tf1_resize_bilinear(x, (299, 299)) - 128) / 128
    if protocol == "pytorch-fid":
        return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    raise InputError(f"unknown protocol {protocol!r}")


# -----------------------------------------------------------------------------
# Inputs: ADM .npz batches (arr_0 uint8 NHWC), image folders, cached statistics
# -----------------------------------------------------------------------------


def _check_images(shape, dtype, what):
    """Raise InputError unless (shape, dtype) describes at least 2 uint8 NHWC RGB images."""
    if dtype != np.uint8:
        raise InputError(f"{what} must be uint8 images in [0, 255], got {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (NCHW? expected NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise InputError(f"{what} must have shape (N, H, W, 3), got {tuple(shape)}{hint}")
    if shape[0] < 2:
        raise InputError(f"{what} needs at least 2 images, got {shape[0]}")


def _npz_images(path):
    """arr_0 of an .npz: a read-only memory map when stored uncompressed (np.savez), else loaded."""
    images = dtr.memmap_npz(path, "arr_0")
    images = np.load(path)["arr_0"] if images is None else images
    _check_images(images.shape, images.dtype, f"{path}: arr_0")
    return images


def _image_size(path):
    """(width, height) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise InputError(f"cannot read image {path}: {e}") from None


class ImageFiles:
    """The images of a folder in file-name order, sliced like an array into uint8 (n, H, W, 3)."""

    def __init__(self, path, num_workers=8):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        self.paths = [os.path.join(path, n) for n in names]
        self.num_workers = max(1, num_workers)
        with ThreadPoolExecutor(self.num_workers) as ex:
            sizes = list(ex.map(_image_size, self.paths))
        for p, s in zip(self.paths, sizes, strict=True):
            if s != sizes[0]:
                raise InputError(
                    f"{path}: images differ in size: {self.paths[0]} is {sizes[0][0]}x"
                    f"{sizes[0][1]} but {p} is {s[0]}x{s[1]}"
                )
        w, h = sizes[0] if sizes else (0, 0)
        self.shape = (len(self.paths), h, w, 3)
        _check_images(self.shape, np.dtype(np.uint8), f"{path}: folder")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with ThreadPoolExecutor(self.num_workers) as ex:
            return np.stack(list(ex.map(lambda p: np.asarray(dtr.open_image(p)), self.paths[index])))


def load_source(path, num_workers=8):
    """REF/SAMPLES -> (images or None, precomputed arrays: ADM's mu/sigma/mu_s/sigma_s, cached pool/logits)."""
    if os.path.isdir(path):
        return ImageFiles(path, num_workers), {}
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if not path.endswith(".npz"):
        raise InputError(f"{path}: expected an .npz file or an image folder")
    try:
        with np.load(path) as npz:
            given = {k: npz[k] for k in STATS_KEYS + ("pool", "logits") if k in npz.files}
            has_images = "arr_0" in npz.files
        images = _npz_images(path) if has_images else None
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if any(k in given for k in STATS_KEYS) and not all(k in given for k in STATS_KEYS):
        raise InputError(f"{path}: needs all of {', '.join(STATS_KEYS)} or none of them")
    if images is None and not {"pool", "logits", *STATS_KEYS} <= given.keys():
        raise InputError(f"{path}: missing arr_0 (uint8 NHWC images)")
    if images is None and len(given["pool"]) < 2:
        raise InputError(f"{path}: needs at least 2 feature vectors")
    return images, given


# -----------------------------------------------------------------------------
# Features
# -----------------------------------------------------------------------------


def _raise_on_every_rank(error):
    """Raise `error` (an InputError or None), or another rank's, on every rank of the process group, so that
    no rank waits forever in a later collective for one that stopped."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else str(error))
        for r, e in enumerate(errors):  # the lowest failed rank's error, on every rank
            if e is not None:
                raise InputError(e if r == 0 else f"rank {r}: {e}")
    elif error is not None:
        raise error


def _on_every_rank(fn):
    """fn() on this rank; an InputError on any rank is raised on every rank (see _raise_on_every_rank)."""
    try:
        result, error = fn(), None
    except InputError as e:
        result, error = None, e
    _raise_on_every_rank(error)
    return result


def _all_gather_rows(x, rows):
    """Concatenate every rank's (n_r, D) tensor in rank order (each padded to `rows` for the collective)."""
    padded = torch.cat([x, x.new_zeros(rows - len(x), x.shape[1])])
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return parts


@torch.inference_mode()
def compute_features(images, model, batch_size=64, protocol="adm", progress=False):
    """uint8 (N, H, W, 3) images (array, memmap or ImageFiles) -> dict of float32 numpy arrays
    pool (N, 2048), spatial (N, 2023), logits (N, 1008), in input order. Under torch.distributed
    each rank runs a contiguous shard and every rank gets all features."""
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(images)
    shard = -(-n // world)
    lo, hi = min(rank * shard, n), min((rank + 1) * shard, n)
    spans = [(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]
    out, error = {k: [torch.empty(0, d, device=device)] for k, d in FEATURE_DIMS.items()}, None
    with ThreadPoolExecutor(1) as io, tqdm(total=hi - lo, unit="img", disable=not progress or rank != 0) as bar:
        try:
            pending = io.submit(images.__getitem__, slice(*spans[0])) if spans else None
            for i in range(len(spans)):
                batch = torch.from_numpy(np.array(pending.result()))  # (n, H, W, 3) uint8
                if i + 1 < len(spans):
                    pending = io.submit(images.__getitem__, slice(*spans[i + 1]))  # read ahead
                for k, v in model(preprocess(batch.to(device), protocol)).items():
                    out[k].append(v.float())
                bar.update(len(batch))
        except InputError as e:  # an unreadable image in this rank's shard
            error = e
    _raise_on_every_rank(error)  # before the gather, which the other ranks would otherwise wait in forever
    feats = {k: torch.cat(v) for k, v in out.items()}
    if world > 1:
        feats = {k: torch.cat(_all_gather_rows(v, shard))[:n] for k, v in feats.items()}
    return {k: v.cpu().numpy() for k, v in feats.items()}


# -----------------------------------------------------------------------------
# Metrics (ADM definitions)
# -----------------------------------------------------------------------------


def feature_statistics(feats):
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise InputError(f"statistics need at least 2 feature vectors, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _sqrt_factor(sigma):
    """A with A A^T = sigma (PSD): its Cholesky factor, or V sqrt(W) from eigh if sigma is singular."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma)
        return v * np.sqrt(w.clip(min=0))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 = sum of sqrt(eigenvalues) of the
    symmetric PSD matrix A^T S2 A, S1 = A A^T (same spectrum as S1 S2; no sqrtm, no complex parts)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise InputError(f"statistics shape mismatch: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    a = _sqrt_factor(sigma1)
    m = a.T @ sigma2 @ a  # (D, D)
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) on consecutive splits of `split_size` in input order (the last may be
    shorter), p(y|x) = softmax of the bias-free logits -> (mean, std) over splits; ADM reports the mean."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)  # (N, C)
    if logp.ndim != 2 or len(logp) == 0:
        raise InputError(f"inception_score needs (N, C) logits, got shape {logp.shape}")
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i : i + split_size]
        log_py = logsumexp(part, axis=0) - np.log(len(part))  # (C,) log of the split's marginal p(y)
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _to_fp16(x):
    """Round float32 values to float16 precision (kept as float32)."""
    return x.half().float()


def _sq_distances(u, v, adm_fp16=True):
    """(b1, D), (b2, D) -> (b1, b2) squared distances |u|^2 - 2 u.v + |v|^2 clamped at 0, as ADM's
    DistanceBlock: rounded through float16 (fp32 accumulation), in float32 if that is not all finite."""
    if adm_fp16:
        u16, v16 = _to_fp16(u), _to_fp16(v)
        nu, nv = _to_fp16(_to_fp16(u16 * u16).sum(1)), _to_fp16(_to_fp16(v16 * v16).sum(1))  # (b1,), (b2,)
        d = _to_fp16(nu[:, None] - _to_fp16(2 * _to_fp16(u16 @ v16.T)))
        d = _to_fp16(d + nv[None]).clamp_min(0)
        if torch.isfinite(d).all():
            return d
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def _knn_radii(x, k, block_size, adm_fp16):
    """(N, D) -> (N,) squared distance to the k-th nearest neighbour, counting the point itself (at 0)."""
    radii = []
    for i in range(0, len(x), block_size):
        best = None  # (b, <= k+1) smallest squared distances so far
        for j in range(0, len(x), block_size):
            d = _sq_distances(x[i : i + block_size], x[j : j + block_size], adm_fp16)
            d = d if best is None else torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values  # ascending
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(ref_feats, sample_feats, k=3, block_size=10000, device=None, adm_fp16=True):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM's ManifoldEstimator: a point is on a
    manifold if d^2 <= r^2 for some point of that set, r = its k-th neighbour distance incl. itself.
    Precision: samples on the reference manifold; recall: references on the sample manifold."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = torch.as_tensor(np.asarray(ref_feats), dtype=torch.float32, device=device)  # (N1, D)
    smp = torch.as_tensor(np.asarray(sample_feats), dtype=torch.float32, device=device)  # (N2, D)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise InputError(f"precision_recall needs (N, D) features of equal D, got {ref.shape}, {smp.shape}")
    if min(len(ref), len(smp)) <= k:
        raise InputError(
            f"precision/recall with k={k} needs more than {k} images per set, got {len(ref)} and {len(smp)}"
        )
    r_ref, r_smp = (_knn_radii(x, k, block_size, adm_fp16) for x in (ref, smp))
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block_size):
        for j in range(0, len(smp), block_size):
            d = _sq_distances(ref[i : i + block_size], smp[j : j + block_size], adm_fp16)  # (b1, b2)
            ref_in[i : i + block_size] |= (d <= r_smp[None, j : j + block_size]).any(1)
            smp_in[j : j + block_size] |= (d <= r_ref[i : i + block_size, None]).any(0)
    return smp_in.sum().item() / len(smp), ref_in.sum().item() / len(ref)


# -----------------------------------------------------------------------------
# Evaluation
# -----------------------------------------------------------------------------


def statistics(feats, given=None):
    """Features (+ precomputed ADM stats, which win, as in ADM) -> mu, sigma, mu_s, sigma_s, pool, logits."""
    given = given or {}
    if "mu" in given:
        stats = {k: given[k] for k in STATS_KEYS}
    else:
        (mu, sigma), (mu_s, sigma_s) = feature_statistics(feats["pool"]), feature_statistics(feats["spatial"])
        stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    return {**stats, "pool": feats["pool"], "logits": feats["logits"]}


def evaluate(ref, sample, k=3):
    """ADM's table from two `statistics` dicts."""
    inception, inception_std = inception_score(sample["logits"])
    precision, recall = precision_recall(ref["pool"], sample["pool"], k)
    return {
        "inception_score": inception,
        "inception_score_std": inception_std,
        "fid": frechet_distance(sample["mu"], sample["sigma"], ref["mu"], ref["sigma"]),
        "sfid": frechet_distance(sample["mu_s"], sample["sigma_s"], ref["mu_s"], ref["sigma_s"]),
        "precision": precision,
        "recall": recall,
    }


def _run(args, device, rank, world):
    """Load, extract and evaluate; only rank 0 prints and writes."""
    paths = [args.paths[0]] if args.save_stats else args.paths
    sources = _on_every_rank(lambda: [load_source(p, args.num_workers) for p in paths])
    model = None
    if any(images is not None for images, _ in sources):
        # rank 0 first, filling the torch.hub cache that the others read; a failure on any rank stops them all
        model = _on_every_rank(lambda: load_inception(args.inception_weights, device) if rank == 0 else None)
        if world > 1:
            model = _on_every_rank(lambda: model if rank == 0 else load_inception(args.inception_weights, device))
    feats = [
        given if images is None else compute_features(images, model, args.batch_size, args.protocol, True)
        for images, given in sources
    ]
    if rank:
        return
    stats = [statistics(f, given) for f, (_, given) in zip(feats, sources, strict=True)]
    if args.save_stats:
        dtr.save_npz(args.paths[1], stats[0])
        print(f"saved statistics and features of {len(stats[0]['pool'])} images to {args.paths[1]}")
        return
    results = evaluate(*stats)
    print(f"Inception Score: {results['inception_score']}")
    print(f"Inception Score std: {results['inception_score_std']}")
    print(f"FID: {results['fid']}")
    print(f"sFID: {results['sfid']}")
    print(f"Precision: {results['precision']}")
    print(f"Recall: {results['recall']}")
    if args.json:
        record = {
            **results,
            "num_ref": len(stats[0]["pool"]),
            "num_samples": len(stats[1]["pool"]),
            "protocol": args.protocol,
        }
        dtr.atomic_write(args.json, lambda tmp: dtr.write_text(tmp, json.dumps(record, indent=2) + "\n"))


def main(args):
    """CLI entry point: one line on stderr (from rank 0) and exit status 1 on every rank for unusable input."""
    torch.backends.cudnn.allow_tf32 = False  # full fp32 convolutions, like the TF reference
    # under torchrun every rank raises the same InputError (_raise_on_every_rank); rank 0 alone prints it
    with dtr.one_line_errors("fid.py"):
        rank, world, device = dtr.setup_distributed(device=args.device)
        try:
            _run(args, device, rank, world)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="FID, sFID, Inception Score, Precision and Recall with the ADM evaluator's definitions."
    )
    parser.add_argument(
        "paths",
        nargs=2,
        metavar="PATH",
        help="REF SAMPLES (ADM .npz batches, image folders or --save-stats files); with --save-stats: SRC OUT.npz",
    )
    parser.add_argument(
        "--save-stats",
        action="store_true",
        help="write statistics and features of SRC to OUT.npz, reusable as REF/SAMPLES",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    weights_help = "path to pt_inception-2015-12-05-6726825d.pth (default: download via torch.hub)"
    parser.add_argument("--inception-weights", default=None, help=weights_help)
    parser.add_argument(
        "--protocol",
        choices=["adm", "pytorch-fid"],
        default="adm",
        help="adm: TF1 bilinear resize + (x-128)/128; pytorch-fid: F.interpolate + 2x-1",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding image files"
    )
    main(parser.parse_args())
