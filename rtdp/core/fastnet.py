"""Batch-1 inference forms of a network: convolutions as packed matrix products, bf16 and int8 weights.

At batch 1 a control policy's 1-D U-Net convolves sequences of 4 to 16
positions, so every convolution is a matrix product with only a few rows.
PyTorch's convolution and ``addmm`` paths repack the weights on every call
for such shapes and run ~3x slower than one pass over the weights. This
module rewrites a trained network, without changing what it computes:

* ``nn.Conv1d`` -> unfold the (padded) input into ``(B * T_out, C_in * k)``
  rows and multiply by the weight reshaped to ``(C_out, C_in * k)``;
* ``nn.ConvTranspose1d`` -> the equivalent convolution on the input with
  ``stride - 1`` zeros inserted between positions, flipped kernel;
* ``nn.Linear`` -> the same packed product.

Every product goes through :class:`PackedLinear`, whose weights are stored
once in the form its kernel reads fastest (oneDNN's blocked layout, measured
at the memory floor for 4-row products on this project's CPUs), in one of
three precisions:

* ``"fp32"``: same results as the plain network up to summation order (~1e-6);
* ``"bf16"``: weights and activations of the products in bfloat16, fp32 out;
* ``"int8"``: weight-only int8 with one scale per output channel (symmetric,
  calibration-free), activations in bf16 (``_weight_int8pack_mm``; needs a
  CPU with native bf16);
* ``"int8dyn"``: the same int8 weights through fbgemm's dynamic product,
  which also quantises each call's activations (one scale per call, computed
  on the fly, so still calibration-free); runs on any x86 CPU and is the
  fastest of the four on this project's machine, at ~3x the int8 error.
  Without AVX512-VNNI the activations get 7 bits instead of 8, so that
  fbgemm's int16 pair sums cannot saturate (``fbgemm_saturates``).

Everything else (GroupNorm, Mish, FiLM, attention arithmetic) is left to the
plain modules. ``fast_network(net, None)`` returns ``net`` itself: the option
off is the plain network, bit for bit.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtdp.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "int8", "int8dyn")

__all__ = [
    "PRECISIONS",
    "FastConv1d",
    "FastConvTranspose1d",
    "PackedLinear",
    "bf16_supported",
    "fast_network",
    "weight_bytes",
]


def bf16_supported() -> bool:
    """Whether the CPU runs bfloat16 products natively (AVX512-BF16 or AMX), per oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fbgemm_saturates() -> bool:
    """Whether fbgemm's int8 products saturate at full-range activations on this CPU.

    Without AVX512-VNNI, fbgemm multiplies uint8 activations by int8 weights
    with ``vpmaddubsw``, which adds each pair of products into a saturating
    int16: two products of 255 x 127 overflow it and the output is silently
    wrong (measured here on an AVX2 CPU: action MSE 6.6e-2 against the plain
    PushT network, instead of ~1e-5). Quantising activations to 7 bits
    (``reduce_range``, what ``torch.ao.quantization`` does for fbgemm) keeps
    every pair in range. With VNNI the products accumulate in int32 and the
    full 8 bits are safe. Unknown CPUs (no ``/proc/cpuinfo``) count as saturating.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_vnni" not in line.split()
    except OSError:
        pass
    return True


def _onednn_packing() -> bool:
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _pack_onednn(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, int(rows_hint))


class PackedLinear(nn.Module):
    """``y = x @ weight.T + bias`` with the weight stored for fast small-batch products.

    Args:
        weight: (N, K) float weight.
        bias: (N,) or None.
        precision: one of ``PRECISIONS``.
        rows_hint: typical number of rows per call (oneDNN picks its blocking from it).

    Attributes:
        backend: the kernel in use: ``"onednn-fp32"``, ``"aten-fp32"``,
            ``"onednn-bf16"``, ``"int8-weight-only"`` (int8) or ``"fbgemm-int8-dynamic"`` (int8dyn).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: str = "fp32", rows_hint: int = 8):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        weight = weight.detach().float().contiguous()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.precision = precision
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed: Any = None
        if precision == "fp32":
            if weight.device.type == "cpu" and _onednn_packing():
                self.backend = "onednn-fp32"
                self._packed = _pack_onednn(weight, rows_hint)
            else:
                self.backend = "aten-fp32"
                self.register_buffer("weight", weight)
        elif precision == "bf16":
            if not bf16_supported():
                raise ConfigError(
                    "precision 'bf16' needs a CPU with native bfloat16 (AVX512-BF16 or AMX); "
                    "this one has none, so bf16 would be slower than fp32: use fp32 or int8dyn"
                )
            self.backend = "onednn-bf16"
            self._packed = _pack_onednn(weight.to(torch.bfloat16), rows_hint)
        else:
            # Symmetric per-output-channel int8: scale = max |w| / 127, no calibration data needed.
            scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            if precision == "int8":
                if not bf16_supported():
                    raise ConfigError(
                        "precision 'int8' (weight-only int8, bf16 activations) needs a CPU with native bfloat16 "
                        "(AVX512-BF16 or AMX); use 'int8dyn' (fbgemm, activations quantised on the fly) or 'fp32'"
                    )
                self.backend = "int8-weight-only"
                # the kernel reads K in blocks of 16 (other widths crash it): pad with zero weights
                self._pad_k = -self.in_features % 16
                self.register_buffer("qweight", F.pad(q, (0, self._pad_k)))
                self.register_buffer("scale", scale.to(torch.bfloat16))
            else:
                self.backend = "fbgemm-int8-dynamic"
                with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated; fbgemm still needs it
                    warnings.simplefilter("ignore", UserWarning)
                    qw = torch.quantize_per_channel(weight, scale.double(),
                                                    torch.zeros_like(scale, dtype=torch.int64), 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
                self._reduce_range = fbgemm_saturates()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend}"

    def weight_bytes(self) -> int:
        """Bytes the kernel reads per call (weights, scales and bias)."""
        n = self.in_features * self.out_features
        if self.precision == "fp32":
            per = 4
        elif self.precision == "bf16":
            per = 2
        else:
            per = 1
        extra = 2 * self.out_features if self.precision.startswith("int8") else 0
        if self.bias is not None:
            extra += 4 * self.out_features
        return n * per + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float32 -> (..., N) float32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "onednn-fp32":
            y = torch.ops.mkldnn._linear_pointwise(x2, self._packed, self.bias, "none", [], "")
        elif self.backend == "aten-fp32":
            y = F.linear(x2, self.weight, self.bias)
        elif self.backend == "onednn-bf16":
            y = torch.ops.mkldnn._linear_pointwise(x2.to(torch.bfloat16), self._packed, None, "none", [], "").float()
            if self.bias is not None:
                y = y + self.bias
        elif self.backend == "int8-weight-only":
            xb = x2.to(torch.bfloat16).contiguous()
            if self._pad_k:
                xb = F.pad(xb, (0, self._pad_k))
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scale).float()
            if self.bias is not None:
                y = y + self.bias
        else:
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._packed, self._reduce_range)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)


class FastConv1d(nn.Module):
    """``nn.Conv1d`` (zero padding, dilation 1, groups 1) as unfold + :class:`PackedLinear`; (B, C, T) in and out."""

    def __init__(self, conv: nn.Conv1d, precision: str = "fp32", rows_hint: int = 8) -> None:
        super().__init__()
        if not _convertible_conv(conv):
            raise ConfigError(f"cannot convert {conv}: needs zero padding, dilation 1, groups 1 and int padding")
        self.kernel_size = conv.kernel_size[0]
        self.stride = conv.stride[0]
        self.padding = conv.padding[0]
        weight = conv.weight.detach()  # (C_out, C_in, k)
        self.linear = PackedLinear(weight.reshape(weight.shape[0], -1), conv.bias, precision, rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, T) -> (B, C_out, T_out)."""
        if self.kernel_size == 1 and self.stride == 1 and self.padding == 0:
            return self.linear(x.transpose(1, 2)).transpose(1, 2)
        if self.padding:
            x = F.pad(x, (self.padding, self.padding))
        return _conv_as_product(self.linear, x, self.kernel_size, self.stride)


class FastConvTranspose1d(nn.Module):
    """``nn.ConvTranspose1d`` (dilation 1, groups 1) as a :class:`FastConv1d` on the zero-stuffed input.

    A transposed convolution with stride s, kernel k, padding p equals a
    stride-1 convolution with the kernel flipped and its channel axes swapped,
    applied to the input with s - 1 zeros between positions and padded by
    k - 1 - p on the left (plus ``output_padding`` on the right).
    """

    def __init__(self, conv: nn.ConvTranspose1d, precision: str = "fp32", rows_hint: int = 8) -> None:
        super().__init__()
        if not _convertible_conv(conv):
            raise ConfigError(f"cannot convert {conv}: needs zero padding, dilation 1 and groups 1")
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if p > k - 1:
            raise ConfigError(f"cannot convert {conv}: padding {p} exceeds kernel_size - 1")
        self.stride = s
        self.pad_left = k - 1 - p
        self.pad_right = k - 1 - p + conv.output_padding[0]
        self.kernel_size = k
        weight = conv.weight.detach().transpose(0, 1).flip(2)  # (C_out, C_in, k)
        self.linear = PackedLinear(weight.reshape(weight.shape[0], -1), conv.bias, precision, rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, T) -> (B, C_out, (T - 1) * s - 2p + k + output_padding)."""
        batch, channels, length = x.shape
        if self.stride > 1:
            up = x.new_zeros(batch, channels, (length - 1) * self.stride + 1)
            up[:, :, :: self.stride] = x
            x = up
        x = F.pad(x, (self.pad_left, self.pad_right))
        return _conv_as_product(self.linear, x, self.kernel_size, 1)


class FastLinear(nn.Module):
    """``nn.Linear`` through :class:`PackedLinear`."""

    def __init__(self, lin: nn.Linear, precision: str = "fp32", rows_hint: int = 8) -> None:
        super().__init__()
        self.linear = PackedLinear(lin.weight, lin.bias, precision, rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _conv_as_product(linear: PackedLinear, x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Valid convolution of the (already padded) x (B, C_in, T) as one product -> (B, C_out, T_out)."""
    batch = x.shape[0]
    cols = x.unfold(2, kernel_size, stride)  # (B, C_in, T_out, k)
    t_out = cols.shape[2]
    rows = cols.permute(0, 2, 1, 3).reshape(batch * t_out, -1)  # row = (c, j) as the weight's (C_in, k)
    return linear(rows).reshape(batch, t_out, -1).transpose(1, 2)


def _convertible_conv(conv: nn.Module) -> bool:
    return (
        conv.groups == 1
        and conv.dilation[0] == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def fast_network(net: nn.Module, precision: str | None, *, rows_hint: int = 8,
                 min_weights: int = 0, fp32_layers: tuple[str, ...] | None = None) -> nn.Module:
    """A copy of ``net`` with its Conv1d / ConvTranspose1d / Linear layers in packed form.

    Args:
        net: a trained network (left untouched).
        precision: one of ``PRECISIONS``, or None for ``net`` itself (no copy, exact).
        rows_hint: typical rows per product at inference (batch 1: the sequence length).
        min_weights: layers with fewer weights stay plain (tiny layers gain nothing).
        fp32_layers: under ``"bf16"`` and ``"int8"``, layers whose qualified name
            contains one of these parts are packed in fp32 instead; None reads
            ``net.bf16_sensitive_layers`` (the U-Net names its FiLM
            conditioning layers there). Both precisions round the layer's input
            to bf16 the same way on every call, so an observation read through
            such a layer is quantised to ~3 significant digits, without the
            per-call dither that int8dyn's activation scale gives; on PushT
            that cost weight-only int8 5 points over 500 episodes (88% vs 93%,
            McNemar p < 0.01), and keeping these layers fp32 brought it to 91%.

    Returns:
        an inference-only module (eval mode, no gradients) computing what
        ``net`` computes; layers it cannot convert (grouped or dilated
        convolutions, non-zero padding modes, the projections inside
        ``nn.MultiheadAttention``) stay plain and are listed in
        ``net_fast.fast_skipped``.

    Raises:
        ConfigError: unknown precision, or bf16 / int8 on a CPU without native bf16.
    """
    if precision is None:
        return net
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    PackedLinear(torch.zeros(1, 1), None, precision)  # a precision this CPU cannot run raises here, before copying
    if fp32_layers is None:
        fp32_layers = tuple(getattr(net, "bf16_sensitive_layers", ()))
    if precision not in ("bf16", "int8"):
        fp32_layers = ()
    out = copy.deepcopy(net).eval().requires_grad_(False)
    skipped: list[str] = []
    converted = 0
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            replacement = None
            if isinstance(module, nn.MultiheadAttention):
                # its forward reads out_proj.weight directly, so the projection must stay an nn.Linear
                skipped.append(full)
            elif isinstance(child, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)):
                if child.weight.numel() < min_weights:
                    continue
                layer_precision = "fp32" if any(part in full for part in fp32_layers) else precision
                if isinstance(child, nn.Linear):
                    replacement = FastLinear(child, layer_precision, rows_hint)
                elif not _convertible_conv(child):
                    skipped.append(full)
                elif isinstance(child, nn.ConvTranspose1d):
                    replacement = FastConvTranspose1d(child, layer_precision, rows_hint)
                else:
                    replacement = FastConv1d(child, layer_precision, rows_hint)
            if replacement is not None:
                setattr(module, child_name, replacement)
                converted += 1
    out.fast_precision = precision
    out.fast_converted = converted
    out.fast_skipped = skipped
    return out


def weight_bytes(net: nn.Module) -> int:
    """Bytes of weights a forward pass reads: packed layers at their stored precision, the rest as stored."""
    total = 0
    packed_ids = set()
    for m in net.modules():
        if isinstance(m, PackedLinear):
            total += m.weight_bytes()
            packed_ids.update(id(b) for b in m.buffers())
    for p in net.parameters():
        total += p.numel() * p.element_size()
    for b in net.buffers():
        if id(b) not in packed_ids and b.is_floating_point():
            total += b.numel() * b.element_size()
    return total
