"""Gram style features g_i from relu2_1 activations (docs/method.md section 1).

    encoder = GramEncoder(build_vgg_encoder(weights), pool=2, dim=0)
    with torch.inference_mode():
        g = encoder(images)          # images: RGB in [0, 1], (N, 3, 224, 224) -> (N, 8256)

Pipeline: relu2_1 (N, 128, 112, 112) -> avg-pool by `pool` -> Gram over channels
`G = F F^T / (h*w)` (fp32, even under autocast) -> `gram_vector` -> optional seeded Gaussian
projection -> L2.

Choices, measured on sketchy-mini with the real VGG weights at 224 px: 600 images from 50
classes in 4 styles (photo, sketch, and two made from other photos of those classes: a 16 px
"mosaic" and a posterised "painting"). Spherical k-means with K = number of styles
(`fit_kmeans`, 5 restarts), purity / ARI as the mean over 5 seeds; NC = accuracy of the nearest
style centroid fitted on half of the classes and tested on the other half::

    pool 2                                     4 styles               photo / sketch
    normalisation                              purity  ARI    NC      purity  ARI
    raw triangle, L2                           0.713   0.581  0.877   0.953   0.821
    raw, signed sqrt, L2                       0.701   0.580  0.880   0.963   0.858
    correlation G_ij/sqrt(G_ii G_jj), L2       0.550   0.329  0.937   0.990   0.960
    correlation, signed sqrt, L2               0.517   0.317  0.940   0.987   0.947
    correlation, minus vector mean, L2         0.651   0.446  0.933   0.983   0.934
    centred Gram -> correlation, L2            0.941   0.853  0.943   0.993   0.973
    centred Gram -> correlation, signed sqrt   0.924   0.814  0.927   0.993   0.973
    centred Gram -> correlation, minus mean    0.998   0.995  0.993   1.000   1.000   <- chosen

Chosen one at pool 1: 0.999 / 0.996; pool 4: 0.980 / 0.948. On 40 held-out classes
(480 images): raw 0.718 / 0.573, correlation 0.683 / 0.528, chosen 0.999 / 0.998 (NC 0.996).
With every channel rescaled by a random factor in [e^-2, e^2] (what separates these weights
from AdaIN's), raw drops to 0.697 / 0.503; all correlation variants are unchanged.
Random-init VGG (seed 0) with the chosen one: 4 styles 0.712 / 0.614 (NC 0.867), photo /
sketch 1.000 / 1.000: random filters see sketch vs photo, not the finer styles.

What the chosen normalisation does and why:
- `centred=True` (GramEncoder's default): the Gram of the features minus their per-image
  spatial mean, i.e. the channel covariance. ReLU features are non-negative, so the plain
  Gram is dominated by products of channel means and all images look alike (mean pairwise
  cosine 0.95 after correlation normalisation). The paper writes `G = F F^T / (h*w)`:
  `gram_matrix(..., centred=False)` is that literal form and `GramEncoder(centred=False)`
  reproduces it.
- Correlation normalisation `G_ij / sqrt(G_ii G_jj)` makes the vector exactly invariant to a
  positive per-channel scale of the features (the shared VGG weights differ from AdaIN's
  `vgg_normalised.pth` by such a scale; see the data README). Channel energy is dropped on
  purpose: any statistic of G that keeps it is not invariant to that scale. Dead channels
  (variance <= 1e-8 of the image's largest, up to 26 of 128 on blank-background sketches)
  get a zero row instead of 0/0.
- Subtracting the vector's own mean removes the common level of all correlations, so cosine
  (and spherical k-means) compares the pattern of correlations.
- Signed square root was tried and hurts here (correlations already lie in [-1, 1]).
- The Gram, the vector and the projection run in fp32 even under autocast: relu2_1 values
  reach ~5e3 with the real weights, so squares would overflow fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Channels whose variance is below this fraction of the image's largest one count as dead.
DEAD_CHANNEL_FRACTION = 1e-8
# Centred channels whose variance is below this fraction of their raw energy are constant.
CONSTANT_CHANNEL_FRACTION = 1e-10


def triangle_length(channels: int) -> int:
    """Length of the upper triangle (with diagonal) of a channels x channels matrix."""
    return channels * (channels + 1) // 2


def gram_matrix(features: torch.Tensor, pool: int, centred: bool = False) -> torch.Tensor:
    """(N, C, H, W) -> avg-pool by `pool` -> G = F F^T / (h*w), (N, C, C) float32."""
    if features.ndim != 4:
        raise ValueError(f"features must be (N, C, H, W); got shape {tuple(features.shape)}")
    if pool < 1:
        raise ValueError(f"pool must be >= 1; got {pool}")
    # The Gram sums h*w products: keep it in fp32 even when the convs ran under autocast.
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = features.float()
        if pool > 1:
            x = F.avg_pool2d(x, kernel_size=pool, stride=pool)
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        if centred:
            mean = flat.mean(dim=2, keepdim=True)
            centred_flat = flat - mean
            # A spatially constant channel leaves fp32 rounding noise after the subtraction;
            # zero it, judged against the channel's own energy (so per-channel-scale-free).
            variance = centred_flat.square().mean(dim=2, keepdim=True)
            energy = flat.square().mean(dim=2, keepdim=True)
            flat = torch.where(variance > energy * CONSTANT_CHANNEL_FRACTION, centred_flat, 0.0)
        return torch.bmm(flat, flat.transpose(1, 2)) / (h * w)


def gram_vector(gram: torch.Tensor) -> torch.Tensor:
    """(N, C, C) Gram -> (N, C*(C+1)/2) L2-normalised, per-channel-scale-invariant vector.

    A Gram with no live channel (e.g. the centred Gram of a blank image) gives the zero vector.
    """
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must be (N, C, C); got shape {tuple(gram.shape)}")
    with torch.autocast(device_type=gram.device.type, enabled=False):
        g = gram.float()
        channels = g.shape[1]
        energy = torch.diagonal(g, dim1=1, dim2=2).clamp_min(0)
        alive = energy > energy.amax(dim=1, keepdim=True) * DEAD_CHANNEL_FRACTION
        inv_std = torch.where(alive, energy.clamp_min(1e-30).rsqrt(), torch.zeros_like(energy))
        correlation = g * inv_std[:, :, None] * inv_std[:, None, :]
        rows, cols = torch.triu_indices(channels, channels, device=g.device)
        vector = correlation[:, rows, cols]
        vector = vector - vector.mean(dim=1, keepdim=True)
        return F.normalize(vector, dim=1)


class GramProjection(nn.Module):
    """Seeded Gaussian random projection in_dim -> dim, then L2; dim=0 means identity + L2."""

    def __init__(self, in_dim: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if in_dim < 1 or dim < 0:
            raise ValueError(f"need in_dim >= 1 and dim >= 0; got in_dim={in_dim}, dim={dim}")
        self.in_dim = in_dim
        self.dim = dim
        self.seed = seed
        matrix = torch.empty(0)
        if dim > 0:
            generator = torch.Generator().manual_seed(seed)
            matrix = torch.randn(in_dim, dim, generator=generator) / dim**0.5
        # Not persistent: the matrix is a pure function of (in_dim, dim, seed).
        self.register_buffer("matrix", matrix, persistent=False)

    @property
    def out_dim(self) -> int:
        return self.dim if self.dim > 0 else self.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected (N, {self.in_dim}) input; got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.dim > 0:
                x = x @ self.matrix.to(x.device)
            return F.normalize(x, dim=1)


class GramEncoder(nn.Module):
    """Images RGB [0, 1] (N, 3, H, W) -> Gram style vectors (N, out_dim), float32, L2."""

    def __init__(
        self,
        vgg: nn.Module,
        pool: int = 2,
        dim: int = 0,
        seed: int = 0,
        centred: bool = True,
        channels: int = 128,
    ) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"pool must be >= 1; got {pool}")
        self.vgg = vgg
        self.pool = pool
        self.centred = centred
        self.projection = GramProjection(triangle_length(channels), dim, seed)

    @property
    def out_dim(self) -> int:
        return self.projection.out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB; got {tuple(images.shape)}")
        # fp32 weights and inputs; on CUDA a caller may wrap this in autocast, then only the
        # convolutions run in half precision (gram_matrix switches autocast off).
        images = images.float()
        features = self.vgg(images)
        gram = gram_matrix(features, self.pool, centred=self.centred)
        return self.projection(gram_vector(gram))
