"""RetinaFace with a ResNet-50 backbone, without torchvision, with the official parameter names.

Architecture of the official `ldm/models/retinaface.py` (after biubug6/Pytorch_Retinaface): a
torchvision-layout ResNet-50 (`body.*`, layers 2-4 as features), an FPN, three SSH context modules
and 1x1 class/box/landmark heads with 2 anchors per position. `forward` returns the raw head
outputs; softmax, prior decoding and NMS live in the torch-free `runtime/faces/detection.py`.
`RetinaFaceSize` scales the widths and block counts: the official file is `RESNET50`, the tiny
preset's random detector a narrow four-block network of the same layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .weights import StateDict, build_strict, meta_shapes, read_state

log = logging.getLogger(__name__)

ANCHORS = 2  # min_sizes per level in the official CONFIGS['resnet50']


@dataclass(frozen=True)
class RetinaFaceSize:
    """Widths and depths: `width` channels of the stem and the first stage's bottlenecks (doubling
    per stage, 4x expansion: layer2..4 give 8, 16 and 32 x width to the FPN), `blocks` bottlenecks
    per stage, `fpn_dim` channels of the FPN, SSH modules and heads."""

    width: int = 64
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)  # He et al. 2016, torchvision resnet50
    fpn_dim: int = 256

    @property
    def feature_dims(self) -> tuple[int, int, int]:
        return (8 * self.width, 16 * self.width, 32 * self.width)


RESNET50 = RetinaFaceSize()  # retinaface_resnet50.pth
TINY_RETINAFACE = RetinaFaceSize(width=8, blocks=(1, 1, 1, 1), fpn_dim=32)  # the tiny preset's


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the official `conv_bn*` helpers; keys `.0` and `.1`.

    The official LeakyReLU has slope 0 when out_dim > 64, which is always the case at ResNet-50 size.
    """
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3), torchvision key names."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50Body(nn.Module):
    """The ResNet-50 trunk up to layer4 (torchvision names, no avgpool/fc): returns layer2..4."""

    def __init__(self, size: RetinaFaceSize = RESNET50) -> None:
        super().__init__()
        w = size.width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        cin = w
        for i, (blocks, width) in enumerate(zip(size.blocks, (w, 2 * w, 4 * w, 8 * w))):
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feats = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats[1:]  # layer2, layer3, layer4


class FPN(nn.Module):
    """Feature pyramid: 1x1 laterals, nearest upsampling to the finer map's size, 3x3 merges."""

    def __init__(self, in_dims: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.output1 = _conv_bn(in_dims[0], dim, 1)
        self.output2 = _conv_bn(in_dims[1], dim, 1)
        self.output3 = _conv_bn(in_dims[2], dim, 1)
        self.merge1 = _conv_bn(dim, dim, 3)
        self.merge2 = _conv_bn(dim, dim, 3)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Single Stage Headless context module (Najibi et al. 2017): 3x3, 5x5 and 7x7 receptive fields."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(dim, dim // 2, 3, relu=False)
        self.conv5X5_1 = _conv_bn(dim, dim // 4, 3)
        self.conv5X5_2 = _conv_bn(dim // 4, dim // 4, 3, relu=False)
        self.conv7X7_2 = _conv_bn(dim // 4, dim // 4, 3)
        self.conv7x7_3 = _conv_bn(dim // 4, dim // 4, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = self.conv5X5_1(x)
        out = [self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(self.conv7X7_2(c5_1))]
        return F.relu(torch.cat(out, dim=1))


class Head(nn.Module):
    """1x1 conv predicting `per_anchor` values for each anchor: [B, C, H, W] -> [B, H*W*A, per_anchor]."""

    def __init__(self, dim: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(dim, ANCHORS * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)  # [B, H, W, A * per_anchor]
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """RetinaFace-ResNet50 (Deng et al. 2020): BGR mean-subtracted 0..255 images -> raw head outputs."""

    def __init__(self, size: RetinaFaceSize = RESNET50) -> None:
        super().__init__()
        dim = size.fpn_dim
        self.body = ResNet50Body(size)
        self.fpn = FPN(size.feature_dims, dim)
        self.ssh1, self.ssh2, self.ssh3 = SSH(dim), SSH(dim), SSH(dim)
        self.class_head = nn.ModuleList([Head(dim, 2) for _ in range(3)])
        self.bbox_head = nn.ModuleList([Head(dim, 4) for _ in range(3)])
        self.landmark_head = nn.ModuleList([Head(dim, 10) for _ in range(3)])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> logits [B, N, 2], box offsets [B, N, 4], landmark offsets [B, N, 10]."""
        fpn = self.fpn(self.body(images))
        ssh = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        scores = torch.cat([h(f) for h, f in zip(self.class_head, ssh)], dim=1)
        boxes = torch.cat([h(f) for h, f in zip(self.bbox_head, ssh)], dim=1)
        landmarks = torch.cat([h(f) for h, f in zip(self.landmark_head, ssh)], dim=1)
        return scores, boxes, landmarks


def retinaface_shapes(size: RetinaFaceSize = RESNET50) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of a RetinaFace (`RESNET50`: as in `retinaface_resnet50.pth`)."""
    return meta_shapes(lambda: RetinaFace(size))


def retinaface_state(raw: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """The official file needs no renaming; a `module.` prefix (DataParallel saves) is stripped."""
    return {k.removeprefix("module."): v for k, v in raw.items()}


def load_retinaface(
    path_or_state: str | Path | Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RetinaFace:
    """Strictly load `retinaface_resnet50.pth` (or a converted state) into an eval-mode RetinaFace."""
    state, source = read_state(path_or_state)
    state = retinaface_state(state, source)
    # BatchNorm statistics and counters keep their own dtypes; only floating tensors are cast
    return build_strict(RetinaFace, state, source, device, dtype)


def random_retinaface_state(
    seed: int = 0, face_bias: float = 0.0, size: RetinaFaceSize = RESNET50
) -> StateDict:
    """Deterministic random weights (NumPy) with valid BatchNorm statistics, for the tiny preset.

    `face_bias` is added to the face logit of every anchor (negative: a detector that finds nothing).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    out: StateDict = {}
    for key, shape in sorted(retinaface_shapes(size).items()):
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.int64)
            continue
        if len(shape) >= 2:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("running_var"):
            value = 1.0 + 0.1 * np.abs(rng.standard_normal(shape))
        elif key.endswith(".weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        if key.startswith("class_head.") and key.endswith("bias"):
            value = value + np.tile([0.0, face_bias], ANCHORS)
        out[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return out


def detector_runner(model: RetinaFace, max_batch: int = 8):
    """A `RunDetector` (NumPy in, NumPy out) over a PyTorch RetinaFace, `max_batch` images per call."""
    param = next(model.parameters())

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        outs: list[tuple[torch.Tensor, ...]] = []
        with torch.inference_mode():
            for i in range(0, len(images), max_batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + max_batch]))
                outs.append(model(x.to(param.device, param.dtype)))
        logits, boxes, landmarks = (torch.cat([o[j] for o in outs]).float().cpu().numpy() for j in range(3))
        return logits, boxes, landmarks

    return run
