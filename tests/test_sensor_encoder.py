"""SensorEncoder: shapes, the no-sensor path, gradients, dtype handling, config checks."""

import pytest
import torch

from vla_ds.errors import ConfigError
from vla_ds.models import count_parameters
from vla_ds.models.sensor_encoder import (
    SensorEncoder,
    SensorEncoderConfig,
    conv_output_length,
)


@pytest.fixture
def tiny_config() -> SensorEncoderConfig:
    return SensorEncoderConfig(
        in_channels=6, window_size=20, conv_channels=(8, 16), kernel_size=3, stride=2,
        d_model=16, num_layers=2, num_heads=4, dim_feedforward=32, dropout=0.0, out_dim=12,
    )


@pytest.fixture
def encoder(tiny_config) -> SensorEncoder:
    torch.manual_seed(0)
    return SensorEncoder(tiny_config).eval()


def _batch(config, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    window = torch.randn(B, config.window_size, config.in_channels, generator=g)
    has_sensor = torch.tensor([True, False, True, False])[:B]
    return window, has_sensor


def test_output_shape_and_downsampled_length(encoder, tiny_config):
    window, has_sensor = _batch(tiny_config)
    out = encoder(window, has_sensor)
    assert out.shape == (4, tiny_config.out_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The position table is sized by the config; it must match what the convs produce.
    conv_len = encoder.conv(window.transpose(1, 2)).shape[-1]
    assert conv_len == tiny_config.downsampled_length == encoder.pos_embedding.shape[1]
    # Reference: 650 samples -> 325 -> 163.
    assert conv_output_length(650, 5, 2, 2) == 163


def test_d_model_different_from_last_conv_gets_a_projection(tiny_config):
    config = SensorEncoderConfig(**{**tiny_config.__dict__, "d_model": 8, "window_size": 7})
    enc = SensorEncoder(config).eval()
    out = enc(torch.randn(2, 7, 6), torch.tensor([True, True]))
    assert out.shape == (2, 12)
    assert isinstance(enc.conv_to_model, torch.nn.Linear)


def test_sensor_rows_depend_on_window(encoder, tiny_config):
    window, has_sensor = _batch(tiny_config)
    out = encoder(window, has_sensor)
    out2 = encoder(window + 1.0, has_sensor)
    assert not torch.allclose(out[has_sensor], out2[has_sensor])


def test_no_sensor_rows_are_the_learned_embedding_whatever_the_window(encoder, tiny_config):
    window, has_sensor = _batch(tiny_config)
    out = encoder(window, has_sensor)
    expected = encoder.no_sensor_embedding.detach().expand(int((~has_sensor).sum()), -1)
    assert torch.equal(out[~has_sensor], expected)

    # Any content in a sensorless row, even NaN from a broken file, changes nothing.
    garbage = window.clone()
    garbage[~has_sensor] = float("nan")
    out2 = encoder(garbage, has_sensor)
    assert torch.equal(out2, out)


def test_gradients_reach_the_encoder_only_from_sensor_rows(encoder, tiny_config):
    window, has_sensor = _batch(tiny_config)
    conv_weight = encoder.conv[0].weight

    # Loss on sensorless rows only: the no-sensor embedding learns, the encoder does not.
    window_nan = window.clone()
    window_nan[~has_sensor] = float("nan")
    encoder(window_nan, has_sensor)[~has_sensor].sum().backward()
    assert torch.equal(conv_weight.grad, torch.zeros_like(conv_weight))
    assert encoder.no_sensor_embedding.grad.abs().sum() > 0

    # Full-batch gradient on the conv equals the gradient from the sensor rows alone.
    encoder.zero_grad()
    target = torch.randn(4, tiny_config.out_dim)
    (encoder(window, has_sensor) * target).sum().backward()
    full = conv_weight.grad.clone()
    assert full.abs().sum() > 0
    encoder.zero_grad()
    (encoder(window[has_sensor], has_sensor[has_sensor]) * target[has_sensor]).sum().backward()
    torch.testing.assert_close(full, conv_weight.grad)


def test_bf16_module_accepts_fp32_input(encoder, tiny_config):
    encoder = encoder.bfloat16()
    window, has_sensor = _batch(tiny_config)
    out = encoder(window, has_sensor)  # window is float32
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out[~has_sensor][0], encoder.no_sensor_embedding.detach())


@pytest.mark.parametrize("window_size", [1, 2, 3])
def test_bf16_gradients_are_finite_and_match_fp32_for_short_windows(tiny_config, window_size):
    # Windows of 1 and 2 samples reach a strided conv at length 1, whose bf16 weight gradient
    # on CPU was NaN or ~1e12 (a third of the training steps skipped). The bf16 gradients
    # must be finite and near the fp32 ones. Sizes of the tiny preset, where it showed.
    config = SensorEncoderConfig(**{**tiny_config.__dict__, "window_size": window_size, "in_channels": 4,
                                    "conv_channels": (32, 64), "kernel_size": 5})
    for seed in range(8):
        torch.manual_seed(seed)
        ref = SensorEncoder(config)
        low = SensorEncoder(config).bfloat16()
        low.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
        ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # same rounded weights
        window, _ = _batch(config, B=16, seed=seed)
        has_sensor = torch.ones(16, dtype=torch.bool)
        target = torch.randn(16, config.out_dim, generator=torch.Generator().manual_seed(seed))
        (ref(window, has_sensor) * target).sum().backward()
        (low(window, has_sensor).float() * target).sum().backward()
        for (name, p32), p16 in zip(ref.named_parameters(), low.parameters()):
            assert torch.isfinite(p16.grad).all(), f"window {window_size}, seed {seed}: {name} gradient not finite"
            scale = p32.grad.abs().max().clamp_min(1e-6)
            assert (p16.grad.float() - p32.grad).abs().max() / scale < 0.1, name


def test_input_mismatches_are_clear_errors(encoder, tiny_config):
    with pytest.raises(ValueError, match=r"has 5 channels .* expects in_channels=6"):
        encoder(torch.randn(2, 20, 5), torch.tensor([True, True]))
    with pytest.raises(ValueError, match=r"has 19 samples .* expects window_size=20"):
        encoder(torch.randn(2, 19, 6), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="has_sensor"):
        encoder(torch.randn(2, 20, 6), torch.tensor([True]))


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 5, r"num_heads must divide d_model, got num_heads=5, d_model=16"),
    ("conv_channels", (), r"conv_channels must be a non-empty"),
    ("conv_channels", (8, 0), r"conv_channels\[1\] must be a positive integer, got 0"),
    ("in_channels", 0, r"in_channels must be a positive integer, got 0"),
    ("num_layers", True, r"num_layers must be a positive integer, got True"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
])
def test_config_rejects_bad_values(tiny_config, field, value, message):
    with pytest.raises(ConfigError, match="SensorEncoderConfig." + message):
        SensorEncoderConfig(**{**tiny_config.__dict__, field: value})


def test_config_accepts_conv_channels_from_json_list(tiny_config):
    config = SensorEncoderConfig(**{**tiny_config.__dict__, "conv_channels": [8, 16]})
    assert config.conv_channels == (8, 16)


def test_reference_size_builds_on_meta_device():
    with torch.device("meta"):
        enc = SensorEncoder(SensorEncoderConfig(in_channels=1026))
    assert enc.pos_embedding.shape == (1, 163, 1024)
    assert count_parameters(enc) == count_parameters(enc, trainable_only=False) > 0
