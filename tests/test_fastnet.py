"""Packed inference forms (rtdp.core.fastnet): exact in fp32, bounded error in int8, exact when off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rtdp.core import fastnet
from rtdp.core.fastnet import (
    FastConv1d,
    FastConvTranspose1d,
    PackedLinear,
    bf16_supported,
    fast_network,
    weight_bytes,
)
from rtdp.errors import ConfigError
from rtdp.policies.unet1d import ConditionalUnet1D

needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="CPU without native bfloat16")
needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="fbgemm int8 kernels not built for this CPU")


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), err


# (C_in, C_out, kernel, stride, padding, T): every Conv1d shape the U-Net uses, plus odd ones
CONV_CASES = [
    (2, 32, 5, 1, 2, 16),     # first block: action dim in
    (64, 32, 5, 1, 2, 8),
    (96, 64, 5, 1, 2, 4),
    (64, 64, 3, 2, 1, 16),    # Downsample1d
    (64, 64, 3, 2, 1, 7),     # odd length
    (48, 24, 1, 1, 0, 8),     # 1x1 residual / final conv
    (16, 8, 4, 3, 2, 11),     # even kernel, stride 3
]


@pytest.mark.parametrize("cin,cout,k,s,p,length", CONV_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv1d_packed_fp32_matches_plain(cin, cout, k, s, p, length, batch):
    torch.manual_seed(0)
    conv = nn.Conv1d(cin, cout, k, stride=s, padding=p)
    x = torch.randn(batch, cin, length)
    with torch.no_grad():
        _close(FastConv1d(conv, "fp32")(x), conv(x))


# (C_in, C_out, kernel, stride, padding, output_padding, T)
TCONV_CASES = [
    (64, 64, 4, 2, 1, 0, 4),  # Upsample1d
    (32, 16, 4, 2, 1, 0, 8),
    (8, 12, 3, 2, 1, 1, 5),   # output_padding
    (8, 12, 3, 1, 1, 0, 6),   # stride 1
    (6, 4, 5, 3, 0, 2, 3),
]


@pytest.mark.parametrize("cin,cout,k,s,p,op,length", TCONV_CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_transpose1d_packed_fp32_matches_plain(cin, cout, k, s, p, op, length, batch):
    torch.manual_seed(1)
    conv = nn.ConvTranspose1d(cin, cout, k, stride=s, padding=p, output_padding=op)
    x = torch.randn(batch, cin, length)
    with torch.no_grad():
        _close(FastConvTranspose1d(conv, "fp32")(x), conv(x))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_packed_fp32_matches_plain(bias):
    torch.manual_seed(2)
    lin = nn.Linear(300, 70, bias=bias)
    for rows in (1, 4, 33):
        x = torch.randn(rows, 300)
        with torch.no_grad():
            _close(PackedLinear(lin.weight, lin.bias, "fp32")(x), lin(x))
    x3 = torch.randn(2, 5, 300)  # leading dims kept
    with torch.no_grad():
        _close(fast_network(nn.Sequential(lin), "fp32")(x3), lin(x3))


def _unet() -> ConditionalUnet1D:
    torch.manual_seed(3)
    net = ConditionalUnet1D(input_dim=2, global_cond_dim=20, diffusion_step_embed_dim=32, down_dims=(32, 64, 128))
    # non-trivial GroupNorm affine parameters, so every path is exercised
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return net.eval()


def test_unet_fast_fp32_matches_plain_per_trajectory_and_per_position():
    net = _unet()
    fast = fast_network(net, "fp32", rows_hint=16)
    assert fast.fast_skipped == []
    n_layers = sum(isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)) for m in net.modules())
    assert fast.fast_converted == n_layers
    assert not any(isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)) for m in fast.modules())
    x, g = torch.randn(3, 16, 2), torch.randn(3, 20)
    with torch.no_grad():
        _close(fast(x, torch.tensor([5, 50, 99]), g), net(x, torch.tensor([5, 50, 99]), g))
        t_pos = torch.tensor([[1.0] * 8 + [40.0] * 8, [3.0] * 16, [0.5] * 4 + [7.0] * 12])  # streaming levels
        _close(fast(x, t_pos, g), net(x, t_pos, g))
    # the original network is untouched
    assert any(isinstance(m, nn.Conv1d) for m in net.modules())


def test_option_off_is_the_plain_network_bit_for_bit():
    net = _unet()
    assert fast_network(net, None) is net
    from rtdp.policies.diffusion_unet import DiffusionUnetConfig, DiffusionUnetPolicy
    from rtdp.policies.runner import Runner

    torch.manual_seed(4)
    policy = DiffusionUnetPolicy(DiffusionUnetConfig(lowdim_shapes={"s": (3,)}, action_dim=2, down_dims=(16, 32)))
    policy.set_normalizer({"s": {"min": -np.ones(3), "max": np.ones(3)}, "action": {"min": -np.ones(2), "max": np.ones(2)}})
    policy.eval()
    obs = {"s": np.random.default_rng(0).uniform(-1, 1, (1, 2, 3)).astype(np.float32)}
    noise = torch.randn(1, 16, 2)
    runner = Runner(policy, "ddim", 5, precision=None)
    assert runner.policy is policy
    a = runner.predict(obs, noise=noise)
    b = policy.predict_action_chunk(obs, sampler="ddim", steps=5, noise=noise, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # the packed fp32 view gives the same actions to float precision, through the same Runner API
    fast = Runner(policy, "ddim", 5, precision="fp32")
    assert fast.policy is not policy and fast.policy.model is not policy.model
    _close(fast.predict(obs, noise=noise), a, 1e-5)
    # the plain policy still holds the plain network
    assert any(isinstance(m, nn.Conv1d) for m in policy.model.modules())


def test_views_are_cached_and_rebuilt_when_weights_change():
    from rtdp.policies.diffusion_unet import DiffusionUnetConfig, DiffusionUnetPolicy

    policy = DiffusionUnetPolicy(DiffusionUnetConfig(lowdim_shapes={"s": (3,)}, action_dim=2, down_dims=(16, 32)))
    v1 = policy.with_network("fp32")
    assert policy.with_network("fp32") is v1
    with torch.no_grad():
        next(policy.model.parameters()).add_(1.0)  # an optimiser step, in place
    v2 = policy.with_network("fp32")
    assert v2 is not v1


def _int8_bound(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # |w - s*q| <= s/2 per weight, s = max|w_n| / 127 per output channel
    scale = weight.abs().amax(dim=1) / 127
    return (scale / 2)[None, :] * x.abs().sum(dim=1, keepdim=True)


@needs_bf16
def test_int8_weight_only_error_is_bounded_on_a_fixed_case():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(96, 200, generator=gen) / 200 ** 0.5
    x = torch.randn(4, 200, generator=gen)
    ref = x @ weight.T
    out = PackedLinear(weight, None, "int8")(x)
    err = (out - ref).abs()
    # weight rounding plus bf16 rounding of the activations (8 bits of mantissa)
    bound = _int8_bound(weight, x) + 2 ** -8 * (x.abs() @ weight.abs().T)
    assert bool((err <= bound).all())
    rel = (err.norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.02  # it does quantise, and stays within 2%


@needs_fbgemm
def test_int8_dynamic_error_is_bounded_on_a_fixed_case():
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(64, 160, generator=gen) / 160 ** 0.5
    bias = torch.randn(64, generator=gen)
    x = torch.randn(3, 160, generator=gen)
    ref = x @ weight.T + bias
    out = PackedLinear(weight, bias, "int8dyn")(x)
    rel = ((out - ref).norm() / (ref - bias).norm()).item()
    assert 1e-4 < rel < 0.05


@needs_fbgemm
def test_int8_dynamic_survives_full_range_positive_activations():
    # Post-Mish activations are mostly positive: quantised to uint8 they reach 255, and
    # 255 x 127 twice overflows the int16 pair sums of fbgemm's non-VNNI kernel. The
    # output must stay as close as int8 rounding allows, on any CPU.
    gen = torch.Generator().manual_seed(7)
    weight = torch.rand(64, 160, generator=gen)
    x = torch.rand(4, 160, generator=gen)
    ref = x @ weight.T
    out = PackedLinear(weight, None, "int8dyn")(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.01


@needs_bf16
@pytest.mark.parametrize("precision,tol", [("bf16", 0.02), ("int8", 0.03)])
def test_unet_low_precision_stays_close(precision, tol):
    net = _unet()
    fast = fast_network(net, precision)
    x, t, g = torch.randn(2, 16, 2), torch.tensor([3, 70]), torch.randn(2, 20)
    with torch.no_grad():
        ref, out = net(x, t, g), fast(x, t, g)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol


@needs_bf16
def test_weight_bytes_follow_precision():
    net = _unet()
    fp32, bf16, int8 = (weight_bytes(fast_network(net, p)) for p in ("fp32", "bf16", "int8"))
    plain = sum(t.numel() * 4 for t in [*net.parameters(), *net.buffers()])
    assert fp32 == pytest.approx(plain, rel=1e-9)
    assert bf16 < 0.6 * plain and int8 < 0.35 * plain


def test_transformer_feed_forward_layers_convert_and_attention_projections_stay():
    torch.manual_seed(7)
    layer = nn.TransformerDecoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    net = nn.TransformerDecoder(layer, num_layers=2).eval()
    fast = fast_network(net, "fp32")
    assert all("out_proj" in s for s in fast.fast_skipped) and len(fast.fast_skipped) == 4
    assert isinstance(fast.layers[0].linear1, fastnet.FastLinear)
    tgt, mem = torch.randn(2, 10, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        _close(fast(tgt, mem), net(tgt, mem))


def test_bad_precision_and_missing_bf16_raise(monkeypatch):
    with pytest.raises(ConfigError, match="precision must be one of"):
        fast_network(_unet(), "fp16")
    monkeypatch.setattr(fastnet, "bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="native bfloat16"):
        fast_network(_unet(), "bf16")
    with pytest.raises(ConfigError, match="int8dyn"):
        fast_network(_unet(), "int8")


def test_unconvertible_layers_stay_plain_and_are_listed():
    net = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, groups=2), nn.Conv1d(4, 4, 3, padding=2, dilation=2),
                        nn.Conv1d(4, 4, 3, padding=1))
    fast = fast_network(net, "fp32")
    assert fast.fast_skipped == ["0", "1"] and fast.fast_converted == 1
    x = torch.randn(1, 4, 9)
    with torch.no_grad():
        _close(fast(x), net(x))



@needs_bf16
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_film_layers_that_read_the_observation_stay_fp32_under_bf16_activations(precision):
    net = _unet()
    fast = fast_network(net, precision)
    layers = {name: m.precision for name, m in fast.named_modules() if isinstance(m, fastnet.PackedLinear)}
    film = [p for n, p in layers.items() if "cond_encoder" in n]
    rest = [p for n, p in layers.items() if "cond_encoder" not in n]
    assert film and all(p == "fp32" for p in film)
    assert rest and all(p == precision for p in rest)
    # asked for nothing kept, every layer takes the precision; int8dyn never keeps any
    plain = fast_network(net, precision, fp32_layers=())
    assert all(m.precision == precision for m in plain.modules() if isinstance(m, fastnet.PackedLinear))
    if "fbgemm" in torch.backends.quantized.supported_engines:
        dyn = fast_network(net, "int8dyn")
        assert all(m.precision == "int8dyn" for m in dyn.modules() if isinstance(m, fastnet.PackedLinear))
    # an observation change below bf16's resolution (at the FiLM layers' input, after Mish) moves the
    # output only when those layers stay fp32
    torch.manual_seed(3)
    x, t, g = torch.randn(1, 16, 2), torch.tensor([3]), torch.full((1, 20), 0.75)
    g2 = g + 2 ** -12
    mish = nn.Mish()
    assert torch.equal(mish(g).bfloat16(), mish(g2).bfloat16())
    with torch.no_grad():
        assert not torch.equal(fast(x, t, g), fast(x, t, g2))
        assert torch.equal(plain(x, t, g), plain(x, t, g2))
