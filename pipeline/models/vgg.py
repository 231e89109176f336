"""Frozen "VGG-normalised" encoder truncated at relu2_1 (docs/method.md section 1).

The layout is the AdaIN style-transfer `nn.Sequential` (a 1x1 input conv, then VGG-19 convs
with reflection padding), cut right after relu2_1, so that a state dict in AdaIN layout
(keys `0, 2, 5, 9, 12, ...`) loads by index::

    0 Conv2d(3, 3, 1)        fixed input conversion (see below)
    1 ReflectionPad2d(1)  2 Conv2d(3, 64, 3)    3 ReLU     relu1_1
    4 ReflectionPad2d(1)  5 Conv2d(64, 64, 3)   6 ReLU     relu1_2
    7 MaxPool2d(2, 2, ceil_mode=True)
    8 ReflectionPad2d(1)  9 Conv2d(64, 128, 3)  10 ReLU    relu2_1  (112 x 112 x 128 at 224)

Input: RGB in [0, 1], shape (N, 3, H, W). Output: relu2_1 activations (N, 128, H/2, W/2).

Layer 0 in the real file is not a learned filter: it is exactly `weight = 255 * (RGB -> BGR
permutation)`, `bias = -(103.939, 116.779, 123.68)` (the Caffe ImageNet mean). With no
weights file the net is seeded random: layer 0 is then the identity (the random convs see RGB
in [0, 1] as is) and every later conv is Kaiming-normal (fan_in, ReLU gain) with zero biases.
Why not the Caffe conversion there too: with zero biases the x255 scale and the channel order
do not matter to random filters, only the mean shift does, and it hurt. Measured on
sketchy-mini (600 images, photo / sketch / mosaic / painting, centred-correlation Gram
vectors at pool 2; 4-means purity, ARI, nearest-centroid accuracy NC), VGG seeds 0 / 1 / 2::

    layer 0             purity              ARI                 NC
    Caffe conversion    0.706 0.604 0.641   0.512 0.386 0.434   0.777 0.757 0.743
    identity            0.712 0.657 0.701   0.614 0.454 0.549   0.867 0.817 0.863

(the real weights reach purity 0.998, ARI 0.995 on the same data; see pipeline/gram.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pipeline.models import WeightsError

VGG_RELU2_1_CHANNELS = 128

# Indices (in the AdaIN Sequential) of the convolutions kept up to relu2_1.
CONV_INDICES = (0, 2, 5, 9)


def _layers() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 3, kernel_size=1),
        nn.ReflectionPad2d(1),
        nn.Conv2d(3, 64, kernel_size=3),
        nn.ReLU(),  # relu1_1
        nn.ReflectionPad2d(1),
        nn.Conv2d(64, 64, kernel_size=3),
        nn.ReLU(),  # relu1_2
        nn.MaxPool2d(kernel_size=2, stride=2, padding=0, ceil_mode=True),
        nn.ReflectionPad2d(1),
        nn.Conv2d(64, 128, kernel_size=3),
        nn.ReLU(),  # relu2_1
    ]


class VGGEncoder(nn.Sequential):
    """The truncated VGG-normalised Sequential, plus where its weights came from."""

    random_init: bool
    weights_path: str | None

    def __init__(self) -> None:
        super().__init__(*_layers())
        self.random_init = True
        self.weights_path = None

    @property
    def out_channels(self) -> int:
        return VGG_RELU2_1_CHANNELS

    def train(self, mode: bool = True) -> VGGEncoder:
        # Frozen feature extractor: stays in eval mode whatever a caller's .train() says
        # (there is no dropout/batchnorm, so this is about intent, not numerics).
        return super().train(False)


def _random_init(encoder: VGGEncoder, seed: int) -> None:
    """Layer 0 identity; Kaiming-normal convs with zero biases from a seeded generator."""
    encoder[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    encoder[0].bias.zero_()
    generator = torch.Generator().manual_seed(seed)
    for index in CONV_INDICES[1:]:
        conv = encoder[index]
        assert isinstance(conv, nn.Conv2d)
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        std = (2.0 / fan_in) ** 0.5  # Kaiming normal, ReLU gain, fan_in mode
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
        conv.bias.zero_()


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG weights file {path} does not exist; pass an existing .pth path "
            "or weights=None for a seeded random initialisation"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt/foreign files
        raise WeightsError(
            f"VGG weights file {path} could not be read by torch.load: {error}"
        ) from error
    if (
        isinstance(loaded, Mapping)
        and "state_dict" in loaded
        and isinstance(loaded["state_dict"], Mapping)
    ):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise WeightsError(
            f"VGG weights file {path} does not hold a state dict (a mapping of str -> Tensor); "
            f"got {type(loaded).__name__}"
        )
    return loaded


def _load_weights(encoder: VGGEncoder, path: Path) -> None:
    state = _read_state_dict(path)
    wanted = encoder.state_dict()
    missing = sorted(key for key in wanted if key not in state)
    if missing:
        raise WeightsError(
            f"VGG weights file {path} lacks keys {missing}; expected the AdaIN "
            f"'VGG-normalised' layout with convolutions at indices {list(CONV_INDICES)}"
        )
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in wanted.items()
        if tuple(state[key].shape) != tuple(tensor.shape)
    ]
    if mismatched:
        raise WeightsError(
            f"VGG weights file {path} has shape mismatches ({'; '.join(mismatched)}); "
            "expected the AdaIN 'VGG-normalised' layout"
        )
    # Deeper keys (12, 16, ... up to relu3_4 in the shared file) are ignored on purpose.
    encoder.load_state_dict({key: state[key].float() for key in wanted}, strict=True)


def build_vgg_encoder(weights: str | Path | None = None, seed: int = 0) -> VGGEncoder:
    """Frozen eval-mode VGG-normalised encoder up to relu2_1; random (seeded) if no weights."""
    encoder = VGGEncoder()
    with torch.no_grad():
        if weights is None:
            _random_init(encoder, seed)
        else:
            path = Path(weights)
            _load_weights(encoder, path)
            encoder.random_init = False
            encoder.weights_path = str(path)
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder.eval()
