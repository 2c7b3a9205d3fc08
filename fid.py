"""FID, sFID, Inception Score, precision and recall as openai's ADM evaluator (guided-diffusion
`evaluations/evaluator.py`, TensorFlow) computes them for the DTR paper, plus KID and FD-DINOv2.

    python fid.py REF SAMPLES [--json results.json]     # ADM .npz batches, image folders or --save-stats files
    python fid.py --save-stats SRC OUT.npz              # cache statistics + features of SRC
    python fid.py REF SAMPLES --metrics fid,sfid,is,pr,kid,fd_dinov2   # all seven numbers

--metrics (default fid,sfid,is,pr: ADM's five numbers):
  fid        FID: Frechet distance of Inception pool_3 features (2048; mean, unbiased covariance)
  sfid       sFID: the same on mixed_6/conv's first 7 channels (17 x 17 x 7, in H, W, C order)
  is         Inception Score: exp E[KL(p(y|x) || p(y))] over splits of 5000 (mean; std also printed)
  pr         precision and recall: k=3 nearest-neighbour balls of pool_3 features (ADM's ManifoldEstimator)
  kid        KID: unbiased MMD^2 of pool_3 features, cubic kernel, 100 subsets of 1000 (torch-fidelity's)
  fd_dinov2  FD-DINOv2: Frechet distance of DINOv2 ViT-L/14 CLS features (EDM2's)

The Inception network is the FID graph of 2015-12-05 with pytorch-fid's weights file, fed as ADM's graph feeds it
(TF1 bilinear resize to 299, then (x - 128) / 128; --protocol pytorch-fid: F.interpolate, then 2x - 1).
"""

import argparse
import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

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
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # ADM reference batches may carry these
FEATURE_DIMS = {"pool": 2048, "spatial": 17 * 17 * 7, "logits": 1008}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# metric -> the network whose features it reads; ADM's evaluator computes the first four
METRICS = {"fid": "inception", "sfid": "inception", "is": "inception", "pr": "inception", "kid": "inception",
           "fd_dinov2": "dinov2"}  # fmt: skip
ADM_METRICS = ("fid", "sfid", "is", "pr")
FEATURE_KEYS = ("pool", "logits", "dinov2")  # the per-image features a --save-stats file keeps
SAVED_FEATURES = {"inception": {*STATS_KEYS, "pool", "logits"}, "dinov2": {"dinov2"}}  # network -> keys read
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


InputError = dtr.InputError  # unusable input (file, array or feature set): main() reports it as one line


#################################################################################
#    Inception network (FID variant of InceptionV3, torchvision-style names)    #
#################################################################################


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (TF's eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place, as torchvision's: one allocation fewer


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
    """Memory layout the network runs fastest in: channels_last on CPU (oneDNN's convolutions), NCHW elsewhere."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


class InceptionV3(nn.Module):
    """The FID Inception network; its state dict is that of pytorch-fid's weights file."""

    dims = FEATURE_DIMS

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
        """(N, 3, 299, 299) in [-1, 1], any memory layout -> dict of pool (N, 2048): pool_3, FID's; spatial
        (N, 2023): mixed_6/conv's first 7 channels, sFID's; logits (N, 1008): the Inception Score's."""
        x = x.contiguous(memory_format=fastest_layout(x.device))  # every later layer keeps this layout
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (N, 64, 147, 147)
        x = _chain(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # (N, 192, 71, 71)
        x = _chain(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)  # (N, 288, 35, 35)
        x = _chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d)  # (N, 768, 17, 17)
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 2023): mixed_6/conv[..., :7] in H, W, C order
        x = _chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # (N, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048): pool_3
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}  # logits (N, 1008)

    def features(self, images, protocol="adm"):
        """uint8 (N, H, W, 3) on the network's device -> pool, spatial, logits."""
        return self(preprocess(images, protocol))


def load_weights(model, weights, url, flag, name):
    """`model` in eval mode on the CPU with the state dict at `weights`, else at `url` via torch.hub's cache
    (offline: one line naming the file to fetch and the flag that takes a local copy)."""
    if weights is None:
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu")
        except Exception as e:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise InputError(
                f"cannot download the {name} weights ({e}); download {url} into {cache} or pass {flag} PATH"
            ) from None
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"cannot read {name} weights {weights}: {e}") from None
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise InputError(f"{weights or url} is not the {name} state dict: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


def load_inception(weights=None, device="cpu"):
    """The FID InceptionV3 with pytorch-fid's weights file (at `weights`, else downloaded)."""
    return load_weights(InceptionV3(), weights, FID_WEIGHTS_URL, "--inception-weights", "FID Inception").to(device)


#################################################################################
#     DINOv2 ViT-L/14 (FD-DINOv2, Stein et al. 2023), torch.hub's state dict    #
#################################################################################


class DinoAttention(nn.Module):
    """Multi-head self-attention with one qkv projection (DINOv2's Attention)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoBlock(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, num_heads), LayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim, eps=1e-6), LayerScale(dim)
        self.mlp = nn.Module()  # named like DINOv2's Mlp: fc1, exact GELU, fc2
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))))


class DINOv2(nn.Module):
    """DINOv2 ViT-L/14 (Oquab et al. 2023) as torch.hub's `dinov2_vitl14`: its state dict loads strictly, and
    forward returns the normalised CLS token, the feature FD-DINOv2 (and EDM2) use."""

    def __init__(self, embed_dim=1024, depth=24, num_heads=16, patch_size=14, pretrain_size=518):
        super().__init__()
        self.dims = {"dinov2": embed_dim}
        self.patch_size, grid = patch_size, pretrain_size // patch_size
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))  # for 518 x 518 inputs
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # used in pretraining only; kept for the file
        self.blocks = nn.ModuleList(DinoBlock(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def position_embedding(self, h, w):
        """(1, 1 + h * w, D) for an h x w patch grid: DINOv2's bicubic resize of the 37 x 37 grid, whose scale
        factor carries a 0.1 offset ((h + 0.1) / 37; no antialiasing), in float32."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        m = math.isqrt(grid.shape[1])
        if (h, w) == (m, m):
            return self.pos_embed
        grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, m, m)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2).to(cls.dtype)], 1)

    def forward(self, x):
        """(N, 3, H, W) normalised with ImageNet's mean and std -> (N, D) CLS features after the final norm."""
        n, _, h, w = x.shape
        x = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)  # (N, T, D)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1) + self.position_embedding(
            h // self.patch_size, w // self.patch_size
        )
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def features(self, images, protocol=None):
        """uint8 (N, H, W, 3) on the network's device -> {"dinov2": (N, D)} (EDM2's preprocessing)."""
        return {"dinov2": self(preprocess_dinov2(images))}


def load_dinov2(weights=None, device="cpu"):
    """DINOv2 ViT-L/14 with torch.hub's dinov2_vitl14_pretrain.pth (at `weights`, else downloaded)."""
    return load_weights(DINOv2(), weights, DINOV2_URL, "--dinov2-weights", "DINOv2 ViT-L/14").to(device)


#################################################################################
#  Preprocessing (ADM's TF graph: ResizeBilinear to 299, then (x - 128) / 128)  #
#################################################################################


def _tf1_taps(n_in, n_out, device):
    """Source rows of TF1's legacy resize: src = dst * (in / out) in float32, floor, clamp, lerp weight."""
    src = torch.arange(n_out, dtype=torch.float32) * (torch.tensor(n_in, dtype=torch.float32) / n_out)
    lo = src.floor()
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo.long().to(device), hi.long().to(device), (src - lo).to(device)


def tf1_resize_bilinear(x, size):
    """TF1 `resize_bilinear` (align_corners=False, no half-pixel centres) of (N, C, H, W), uint8 or float, to
    float32 (N, C, out_h, out_w) in channels_last memory: TF's lerps, top = tl + (tr - tl) * wx, likewise
    bottom, then top + (bottom - top) * wy, each rounded as TF rounds them."""
    n, c, h, w = x.shape
    y0, y1, wy = _tf1_taps(h, size[0], x.device)
    x0, x1, wx = _tf1_taps(w, size[1], x.device)
    x = x.permute(0, 2, 3, 1)  # (N, H, W, C): rows and C-interleaved columns are contiguous
    left = x.index_select(2, x0).float().view(n, h, -1)  # (N, H, out_w * C)
    right = x.index_select(2, x1).float().view(n, h, -1)
    # each source row is lerped along x once (TF lerps the two each output row reads: the same values), in place
    # and over contiguous inner dims, rather than gathering four neighbours per output pixel
    rows = right.sub_(left).mul_(wx.repeat_interleave(c)).add_(left)  # (N, H, out_w * C)
    top, bottom = rows.index_select(1, y0), rows.index_select(1, y1)  # (N, out_h, out_w * C)
    out = bottom.sub_(top).mul_(wy[:, None]).add_(top)
    return out.view(n, *size, c).permute(0, 3, 1, 2)


def preprocess(images, protocol="adm"):
    """uint8 (N, H, W, 3) -> float32 (N, 3, 299, 299) network input, as ADM's graph or as pytorch-fid."""
    x = images.permute(0, 3, 1, 2)  # (N, 3, H, W) in [0, 255]
    if protocol == "adm":
        return tf1_resize_bilinear(x, (299, 299)).sub_(128).div_(128)
    if protocol == "pytorch-fid":
        return 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    raise InputError(f"unknown protocol {protocol!r}")


def preprocess_dinov2(images, size=224):
    """uint8 (N, H, W, 3) -> float32 (N, 3, 224, 224) DINOv2 input, as EDM2 (resize_mode 'torch'): bicubic resize
    with antialiasing on [0, 255], then to [0, 1] and ImageNet's mean and std."""
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic", antialias=True)
    mean, std = (x.new_tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x / 255 - mean) / std


#################################################################################
#  Inputs: ADM .npz batches (arr_0 uint8 NHWC), image folders, saved statistics #
#################################################################################


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
            given = {k: npz[k] for k in STATS_KEYS + FEATURE_KEYS if k in npz.files}
            has_images = "arr_0" in npz.files
        images = _npz_images(path) if has_images else None
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if any(k in given for k in STATS_KEYS) and not all(k in given for k in STATS_KEYS):
        raise InputError(f"{path}: needs all of {', '.join(STATS_KEYS)} or none of them")
    if images is None and not any(keys <= given.keys() for keys in SAVED_FEATURES.values()):
        raise InputError(f"{path}: missing arr_0 (uint8 NHWC images)")
    if images is None and min(len(v) for k, v in given.items() if k in FEATURE_KEYS) < 2:
        raise InputError(f"{path}: needs at least 2 feature vectors")
    return images, given


def check_saved_features(path, given, networks):
    """Raise InputError unless the --save-stats file at `path` holds what the metrics of `networks` read."""
    for net in networks:
        if not SAVED_FEATURES[net] <= given.keys():
            wanted = ",".join(m for m, n in METRICS.items() if n == net)
            raise InputError(f"{path} has no {net} features and no images; save it again with --metrics {wanted}")


#################################################################################
#                                    Features                                   #
#################################################################################


def _all_gather_rows(x, rows):
    """Concatenate every rank's (n_r, D) tensor in rank order (each padded to `rows` for the collective)."""
    padded = torch.cat([x, x.new_zeros(rows - len(x), x.shape[1])])
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return parts


@torch.inference_mode()
def batch_features(networks, images, protocol="adm"):
    """uint8 (N, H, W, 3) images on the networks' device -> every network's features, float32 (N, D) tensors."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul  # full fp32 (no TF32), like the TF reference
    tf32, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        with cudnn.flags(
            enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
        ):
            return {k: v.float() for net in networks for k, v in net.features(images, protocol).items()}
    finally:
        matmul.allow_tf32 = tf32


class SameThread:
    """ThreadPoolExecutor's submit() and context, run on the calling thread (compute_features without read-ahead)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


@torch.inference_mode()
def compute_features(images, networks, batch_size=64, protocol="adm", progress=False, read_ahead=True):
    """uint8 (N, H, W, 3) images (array, memmap or ImageFiles) -> dict of float32 numpy arrays in input order:
    pool (N, 2048), spatial (N, 2023), logits (N, 1008) from an InceptionV3, dinov2 (N, 1024) from a DINOv2
    (`networks`: one or a list). Under torch.distributed each rank runs a contiguous shard and every rank gets
    all features. read_ahead: read the next batch on a second thread while this one runs (files); False reads on
    this thread (images generated on the fly)."""
    networks = networks if isinstance(networks, (list, tuple)) else [networks]
    device = next(networks[0].parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(images)
    shard = -(-n // world)
    lo, hi = min(rank * shard, n), min((rank + 1) * shard, n)
    spans = [(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]
    dims = {k: d for net in networks for k, d in net.dims.items()}
    out = {k: [torch.empty(0, d, device=device)] for k, d in dims.items()}
    # an unreadable image in this rank's shard stops every rank before the gather, which they would wait in forever
    bar = tqdm(total=hi - lo, unit="img", disable=not progress or rank != 0)
    with dtr.shared_errors(), ThreadPoolExecutor(1) if read_ahead else SameThread() as io, bar:
        pending = io.submit(images.__getitem__, slice(*spans[0])) if spans else None
        for i in range(len(spans)):
            batch = torch.from_numpy(np.array(pending.result()))  # (n, H, W, 3) uint8
            if i + 1 < len(spans):
                pending = io.submit(images.__getitem__, slice(*spans[i + 1]))  # read ahead
            for k, v in batch_features(networks, batch.to(device), protocol).items():
                out[k].append(v)
            bar.update(len(batch))
    feats = {k: torch.cat(v) for k, v in out.items()}
    if world > 1:
        feats = {k: torch.cat(_all_gather_rows(v, shard))[:n] for k, v in feats.items()}
    return {k: v.cpu().numpy() for k, v in feats.items()}


#################################################################################
#                           Metrics (ADM definitions)                           #
#################################################################################


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
    symmetric PSD matrix A^T S2 A, S1 = A A^T (same spectrum as S1 S2; no sqrtm, no complex parts).
    FID: on the feature_statistics of pool_3 features; sFID: of the spatial ones; FD-DINOv2: of DINOv2's."""
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


def kernel_inception_distance(ref_feats, sample_feats, subsets=100, subset_size=1000, seed=2020):
    """KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with kernel k(x, y) = (x.y / d + 1)^3, over
    `subsets` random subsets of `subset_size` features of each set (all of a smaller set), each drawn without
    replacement, sample set first, from numpy's RandomState(seed) -> (mean, std) over the subsets. With at
    least `subset_size` features per set this is torch-fidelity's KID (its defaults: 100, 1000, seed 2020)."""
    x, y = np.asarray(sample_feats, np.float64), np.asarray(ref_feats, np.float64)  # (N1, D), (N2, D)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise InputError(f"KID needs (N, D) features of equal D, got {y.shape}, {x.shape}")
    m, d = min(len(x), len(y), subset_size), x.shape[1]
    if subsets < 1 or subset_size < 2:
        raise InputError(f"KID needs at least 1 subset of at least 2 images, got {subsets} of {subset_size}")
    if m < 2:
        raise InputError(f"KID needs at least 2 images per set, got {len(y)} and {len(x)}")
    rng, mmds = np.random.RandomState(seed), []
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]  # (m, D) each
        k_aa, k_bb, k_ab = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))  # (m, m) each
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))  # off-diagonal means
        mmds.append(within - 2 * k_ab.mean())
    return float(np.mean(mmds)), float(np.std(mmds))


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
    """Improved precision/recall (Kynkaanniemi et al. 2019) of pool_3 features as ADM's ManifoldEstimator: a point
    is on a manifold if d^2 <= r^2 for some point of that set, r = its k-th neighbour distance incl. itself, the
    squared distances rounded through float16 as ADM's DistanceBlock (adm_fp16; see _sq_distances).
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


#################################################################################
#                                   Evaluation                                  #
#################################################################################


def statistics(feats, given=None):
    """Features (+ precomputed ADM stats, which win, as in ADM) -> what the metrics read: mu, sigma, mu_s, sigma_s
    (Inception pool and spatial), mu_dinov2, sigma_dinov2, and the features pool, logits, dinov2 (those present)."""
    given = given or {}
    feats = {**{k: v for k, v in given.items() if k in FEATURE_KEYS}, **feats}
    stats = {k: given[k] for k in STATS_KEYS if "mu" in given}
    if not stats and "spatial" in feats:
        (mu, sigma), (mu_s, sigma_s) = feature_statistics(feats["pool"]), feature_statistics(feats["spatial"])
        stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if "dinov2" in feats:
        stats["mu_dinov2"], stats["sigma_dinov2"] = feature_statistics(feats["dinov2"])
    return {**stats, **{k: feats[k] for k in FEATURE_KEYS if k in feats}}


def evaluate(ref, sample, k=3, metrics=ADM_METRICS, kid_subsets=100, kid_subset_size=1000):
    """The chosen metrics from two `statistics` dicts; by default ADM's table."""
    fd = lambda key: frechet_distance(sample[f"mu{key}"], sample[f"sigma{key}"], ref[f"mu{key}"], ref[f"sigma{key}"])
    results = {}
    if "is" in metrics:
        results["inception_score"], results["inception_score_std"] = inception_score(sample["logits"])
    if "fid" in metrics:
        results["fid"] = fd("")
    if "sfid" in metrics:
        results["sfid"] = fd("_s")
    if "pr" in metrics:
        results["precision"], results["recall"] = precision_recall(ref["pool"], sample["pool"], k)
    if "kid" in metrics:
        results["kid"], results["kid_std"] = kernel_inception_distance(
            ref["pool"], sample["pool"], kid_subsets, kid_subset_size
        )
    if "fd_dinov2" in metrics:
        results["fd_dinov2"] = fd("_dinov2")
    return results


RESULT_NAMES = {"inception_score": "Inception Score", "inception_score_std": "Inception Score std", "fid": "FID",
                "sfid": "sFID", "precision": "Precision", "recall": "Recall", "kid": "KID", "kid_std": "KID std",
                "fd_dinov2": "FD-DINOv2"}  # fmt: skip


def parse_metrics(text):
    """'fid,kid' -> ('fid', 'kid'), in METRICS order; unknown names raise InputError."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise InputError(f"--metrics {text!r}: choose from {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def describe(metrics, protocol="adm", kid_subsets=100, kid_subset_size=1000):
    """One line: which metrics, on which network's features, with which preprocessing."""
    inception = [m for m in metrics if METRICS[m] == "inception"]
    parts = (
        [f"{', '.join(inception)} on FID Inception-v3 (2015-12-05) features, {protocol} preprocessing"]
        if inception
        else []
    )
    if "kid" in metrics:
        parts.append(f"KID over {kid_subsets} subsets of up to {kid_subset_size}")
    if "fd_dinov2" in metrics:
        parts.append(
            "fd_dinov2 on DINOv2 ViT-L/14 CLS features, EDM2 preprocessing (bicubic to 224, ImageNet mean/std)"
        )
    return "metrics: " + "; ".join(parts)


def report(results, json_path=None, **record):
    """Print the results, one per line, and write them with `record` to `json_path` (atomically)."""
    for key, value in results.items():
        print(f"{RESULT_NAMES[key]}: {value}")
    if json_path:
        text = json.dumps({**results, **record}, indent=2) + "\n"
        dtr.atomic_write(json_path, lambda tmp: dtr.write_text(tmp, text))


def score(ref, sample, metrics, protocol="adm", json_path=None, kid_subsets=100, kid_subset_size=1000, **record):
    """Rank 0: name what is computed (describe), then evaluate and report two `statistics` dicts; the JSON also
    holds the set sizes, the protocol, the metrics and `record`."""
    print(describe(metrics, protocol, kid_subsets, kid_subset_size))
    results = evaluate(ref, sample, metrics=metrics, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    sizes = dict(num_ref=num_images(ref), num_samples=num_images(sample))
    report(results, json_path, **sizes, protocol=protocol, metrics=list(metrics), **record)
    return results


def num_images(stats):
    """How many images a `statistics` dict (or a feature dict) describes."""
    return len(stats[next(k for k in FEATURE_KEYS if k in stats)])


def open_source(path, networks, num_workers=8):
    """Every rank: REF/SAMPLES -> (images or None, saved arrays), refusing a --save-stats file that lacks the
    features of `networks`; an InputError on any rank stops them all (dtr.shared_errors)."""
    with dtr.shared_errors():
        images, given = load_source(path, num_workers)
        if images is None:
            check_saved_features(path, given, networks)
    return images, given


def source_features(source, networks, batch_size=64, protocol="adm", progress=False):
    """Every rank: an open source's features, extracted over all ranks (compute_features), or those it saved."""
    images, given = source
    return given if images is None else compute_features(images, networks, batch_size, protocol, progress)


def load_networks(names, device, inception_weights=None, dinov2_weights=None, rank=0, world=1):
    """The feature networks `names` ('inception', 'dinov2'): rank 0 loads first, filling the torch.hub cache that
    the other ranks then read; a failure on any rank stops them all."""
    load = {"inception": lambda: load_inception(inception_weights, device),
            "dinov2": lambda: load_dinov2(dinov2_weights, device)}  # fmt: skip
    with dtr.shared_errors():
        networks = [load[n]() for n in names] if rank == 0 else None
    if world > 1:
        with dtr.shared_errors():
            networks = networks if rank == 0 else [load[n]() for n in names]
    return networks


def _run(args, device, rank, world):
    """Load, extract and evaluate; only rank 0 prints and writes."""
    metrics = parse_metrics(args.metrics)
    names = list(dict.fromkeys(METRICS[m] for m in metrics))  # the networks these metrics read
    paths = [args.paths[0]] if args.save_stats else args.paths
    sources = [open_source(p, names, args.num_workers) for p in paths]
    networks = None
    if any(images is not None for images, _ in sources):
        networks = load_networks(names, device, args.inception_weights, args.dinov2_weights, rank, world)
    feats = [source_features(s, networks, args.batch_size, args.protocol, progress=True) for s in sources]
    if rank:
        return
    stats = [statistics(f, given) for f, (_, given) in zip(feats, sources, strict=True)]
    if args.save_stats:
        dtr.save_npz(args.paths[1], stats[0])
        print(f"saved statistics and features ({', '.join(names)}) of {num_images(stats[0])} images to {args.paths[1]}")
        return
    kid = dict(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size)
    score(*stats, metrics, protocol=args.protocol, json_path=args.json, **kid)


def main(args):
    """CLI entry point: unusable input is one line on stderr and exit status 1, on every rank (dtr.one_line_errors)."""
    with dtr.one_line_errors("fid.py"):
        rank, world, device = dtr.setup_distributed(device=args.device)
        _run(args, device, rank, world)
        if dist.is_initialized():  # not after an error: the ranks stop at once (dtr.exit_now)
            dist.destroy_process_group()


def parser():
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "paths",
        nargs=2,
        metavar="PATH",
        help="REF SAMPLES (ADM .npz batches, image folders or --save-stats files); with --save-stats: SRC OUT.npz",
    )
    p.add_argument(
        "--save-stats",
        action="store_true",
        help="write statistics and features of SRC (those --metrics reads) to OUT.npz, reusable as REF/SAMPLES",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    weights_help = "path to pt_inception-2015-12-05-6726825d.pth (default: download via torch.hub)"
    p.add_argument("--inception-weights", default=None, help=weights_help)
    protocol_help = "adm: TF1 bilinear resize + (x-128)/128; pytorch-fid: F.interpolate + 2x-1"
    p.add_argument("--protocol", choices=["adm", "pytorch-fid"], default="adm", help=protocol_help)
    p.add_argument(
        "--metrics",
        default=",".join(ADM_METRICS),
        help=f"comma-separated, from {','.join(METRICS)} (above; default: ADM's five numbers)",
    )
    dinov2_help = "path to dinov2_vitl14_pretrain.pth (default: download via torch.hub)"
    p.add_argument("--dinov2-weights", default=None, help=dinov2_help)
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: subsets drawn (numpy seed 2020)")
    p.add_argument(
        "--kid-subset-size", type=int, default=1000, help="KID: images per subset, capped at the smaller set's size"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding image files")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
