"""`evaluation.features: inception`: the FID Inception-v3 in pure torch, loaded from a local weights file.

The network, its preprocessing and its outputs mirror torch-fidelity 0.4.0's
`feature_extractor_inceptionv3.py` and `interpolate_compat_tensorflow.py` (Apache-2.0, Anton Obukhov;
adapted there from pytorch-fid, Apache-2.0): uint8 images resized to 299x299 by TensorFlow 1.x's
bilinear rule, scaled by (x - 128) / 128, the TF-compatible blocks (average pools that skip the
padding, a max pool in the last block), the 2048-d pool features (FID's and KID's) and the 1008
unbiased logits (`fc` without its bias: the Inception Score's). torch-fidelity and torchmetrics'
default FID cannot be used here: both import torchvision, which does not import beside torch's CPU build.

The weights are torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` is the same file: same keys, same hash), or the same state dict
saved as safetensors. They are read from `evaluation.source` (a file, or a folder holding one; a path or
fsspec URL) and never downloaded from anywhere else. A `.pth` is a pickle: `torch.load(weights_only=True)`
unpickles tensors only, but `safetensors_only: true` (the default) still refuses it, as it refuses
pickled weights everywhere in imagemill.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imagemill.core.errors import ImagemillError
from imagemill.core.model_source import weights_file
from imagemill.core.spec import EvaluationSpec

SIZE = 299


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **conv: object):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool: the padded zeros are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch5x5_1, self.branch5x5_2),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.branch_pool(_average_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, column = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **column)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **column)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **column)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4)
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _chain(x, *double, self.branch7x7dbl_5),
                self.branch_pool(_average_pool(x)),
            ],
            1,
        )


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat(
            [
                _chain(x, self.branch3x3_1, self.branch3x3_2),
                _chain(x, *seven),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionE(nn.Module):
    """torch-fidelity's InceptionE_1 (`pool` an average pool) and InceptionE_2 (TF's max pool)."""

    def __init__(self, in_channels: int, pool: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(self.pool(x)),
            ],
            1,
        )


def resize_like_tensorflow1x(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(N, C, H, W) float32 → (N, C, size, size): TF 1.x's bilinear resize (align_corners false), as
    torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x(method="slow")` computes it."""

    def grid(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position = torch.arange(size, dtype=images.dtype, device=images.device) * torch.tensor(
            length / size, dtype=torch.float32
        )
        low = position.long()
        return low, (low + 1).clamp_max(length - 1), position - low.float()

    def along_x(rows: torch.Tensor) -> torch.Tensor:
        low = rows[:, :, :, x_low]
        return low + (rows[:, :, :, x_high] - low) * dx.view(1, 1, 1, size)

    (y_low, y_high, dy), (x_low, x_high, dx) = grid(images.shape[2]), grid(images.shape[3])
    upper, lower = along_x(images[:, :, y_low, :]), along_x(images[:, :, y_high, :])
    return upper + (lower - upper) * dy.view(1, 1, size, 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3: (N, 3, H, W) uint8 → (2048-d pool features, 1008 unbiased logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, _average_pool)
        self.Mixed_7c = InceptionE(2048, lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 → (N, 2048) float32 pool features."""
        x = resize_like_tensorflow1x(images.float())
        x = ((x - 128) / 128).to(self.fc.weight.dtype)
        x = _chain(x, *list(self.children())[:-1])
        return torch.flatten(x, 1).float()

    def unbiased_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 2048) pool features → (N, 1008) logits without `fc`'s bias: what torch-fidelity and
        torchmetrics compute the Inception Score from."""
        return features.to(self.fc.weight.dtype).mm(self.fc.weight.T).float()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return features, self.unbiased_logits(features)


def _state_dict(spec: EvaluationSpec) -> tuple[str, dict[str, torch.Tensor]]:
    """The weights file's name and its state dict, under the safetensors rule."""
    fs, path = weights_file(spec)
    name = path.rpartition("/")[2]
    if not name.endswith(".safetensors") and spec.safetensors_only:
        raise ImagemillError(
            f"evaluation.source {name} is a pickled state dict, and evaluation.safetensors_only: true "
            "refuses pickles: save it with safetensors.torch.save_file, or set "
            "evaluation.safetensors_only: false (then read by torch.load(weights_only=True): tensors only)"
        )
    with fs.open(path, "rb") as f:  # type: ignore[attr-defined]
        data = f.read()
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load

            return name, load(data)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ImagemillError(f"evaluation.source {name} does not read as a state dict ({reason})") from None
    if not isinstance(state, dict):
        raise ImagemillError(f"evaluation.source {name} holds a {type(state).__name__}, not a state dict")
    return name, state


def load_inception(spec: EvaluationSpec, device: str) -> InceptionV3:
    """The network with the weights `evaluation.source` names, every key checked, on `device`."""
    name, state = _state_dict(spec)
    model = InceptionV3()
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    problems = (("lacks", missing), ("has the unexpected", unexpected), ("has a wrong-shaped", wrong_shape))
    for problem, keys in problems:
        if keys:
            raise ImagemillError(
                f"evaluation.source {name} is not an FID Inception-v3 state dict: it {problem} key {keys[0]} "
                f"({len(keys)} such); use torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
            )
    model.load_state_dict(state)
    return model.to(device, getattr(torch, spec.dtype)).eval().requires_grad_(False)


class InceptionFeatures:
    """`features: inception`, as the feature model's `embed`/`dim`, plus the class head for the
    Inception Score (`class_logits`)."""

    def __init__(self, spec: EvaluationSpec, device: str):
        self.model = load_inception(spec, device)
        self.dim: int = 2048

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """(N, H, W, 3) uint8 images, on any device → their (N, 2048) float32 pool features, on the CPU."""
        return self.model.features(images.permute(0, 3, 1, 2)).cpu().numpy()

    @torch.inference_mode()
    def class_logits(self, features: np.ndarray) -> np.ndarray:
        """(N, 2048) features (from `embed`) → their (N, 1008) unbiased logits, on the CPU."""
        head = torch.from_numpy(features).to(self.model.fc.weight.device)
        return self.model.unbiased_logits(head).cpu().numpy()
