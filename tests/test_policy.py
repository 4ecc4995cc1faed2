"""VLAPolicy on the tiny backbone: batch -> loss, masking and weighting, inference path."""

import dataclasses

import numpy as np
import pytest
import torch

from vla_ds.data import DataConfig, VLADataset, compute_norm_stats
from vla_ds.data.loading import PolicyCollator
from vla_ds.models.action_expert import ActionExpertConfig
from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder
from vla_ds.models.policy import VLAPolicy
from vla_ds.models.sensor_encoder import SensorEncoderConfig
from vla_ds.training.config import MODEL_PRESETS

WINDOW = 32


@pytest.fixture(scope="module")
def parts(tiny_backbone_dir, demo_dataset_dir):
    bcfg = BackboneConfig(model_name_or_path=str(tiny_backbone_dir), dtype="float32")
    dataset = VLADataset.from_config(DataConfig(dataset_dir=str(demo_dataset_dir), sensor_window_size=WINDOW))
    stats = compute_norm_stats(dataset)
    return bcfg, dataset, stats


def make_policy(parts, sensor_loss_weight=1.0, stats=None):
    bcfg, dataset, default_stats = parts
    torch.manual_seed(0)
    preset = MODEL_PRESETS["tiny"]
    policy = VLAPolicy(VLBackbone(bcfg), SensorEncoderConfig(**preset["sensor_encoder"]),
                       ActionExpertConfig(**preset["action_expert"]), stats or default_stats,
                       sensor_channels=dataset.sensor_channels, sensor_window_size=WINDOW,
                       sensor_loss_weight=sensor_loss_weight)
    policy.backbone.freeze()
    policy.input_builder = VLInputBuilder.from_pretrained(bcfg)
    return policy.eval()


def batch_of(parts, indices):
    bcfg, dataset, _ = parts
    collate = PolicyCollator(VLInputBuilder.from_pretrained(bcfg))
    return collate([dataset[i] for i in indices])


def mixed_indices(dataset, n=4):
    """Samples with and without sensor data, and one near an episode end (padded steps)."""
    has = [i for i in range(len(dataset)) if dataset.get_item(i, with_images=False)["has_sensor"]]
    hasnt = [i for i in range(len(dataset)) if i not in set(has)]
    padded = [i for i in has if dataset.get_item(i, with_images=False)["action_is_pad"].any()]
    return [has[0], hasnt[0], padded[0], hasnt[1]][:n]


def fixed_noise(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, a = batch["actions"].shape
    return torch.randn(b, h, a, generator=g), torch.randint(0, 100, (b,), generator=g)


def test_forward_returns_a_finite_loss_with_shapes(parts):
    policy = make_policy(parts)
    batch = batch_of(parts, mixed_indices(parts[1]))
    out = policy(batch)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert out["per_sample_loss"].shape == (4,)
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 4 * parts[1].num_views


def test_padded_steps_do_not_change_the_loss(parts):
    policy = make_policy(parts)
    batch = batch_of(parts, mixed_indices(parts[1]))
    batch["noise"], batch["timesteps"] = fixed_noise(batch)
    base = policy(batch)["loss"]
    pad = batch["action_is_pad"]
    assert pad.any() and (~pad).any()
    changed = dict(batch, actions=torch.where(pad[..., None], batch["actions"] + 100.0, batch["actions"]))
    assert torch.allclose(policy(changed)["loss"], base, atol=1e-6)
    real = dict(batch, actions=torch.where(pad[..., None], batch["actions"], batch["actions"] + 1.0))
    assert not torch.allclose(policy(real)["loss"], base, atol=1e-3)


def test_sensor_loss_weight_and_confidence_weight_each_sample(parts):
    batch = batch_of(parts, mixed_indices(parts[1]))
    batch["noise"], batch["timesteps"] = fixed_noise(batch)
    out1 = make_policy(parts, sensor_loss_weight=1.0)(batch)
    out3 = make_policy(parts, sensor_loss_weight=3.0)(batch)
    has = batch["has_sensor"]
    expected_w = batch["confidence"] * torch.where(has, 3.0, 1.0)
    assert torch.allclose(out3["sample_weight"], expected_w)
    # Same weights and noise: only the weighting differs.
    assert torch.allclose(out1["per_sample_loss"], out3["per_sample_loss"], atol=1e-6)
    assert torch.allclose(out3["loss"], (expected_w * out3["per_sample_loss"]).mean(), atol=1e-6)


def test_padding_rows_of_a_sensor_window_read_as_the_mean(parts):
    """Front padding (raw zeros before the stream started) is not a reading: it enters the
    encoder as the training mean (0 after normalisation), exactly as a window whose missing
    rows held the mean would, and not as raw zeros (-mean/std: several sigma off)."""
    bcfg, dataset, stats = parts
    shifted = dataclasses.replace(stats, sensor_mean=stats.sensor_mean + 3.0)  # zeros are 3+ sigma away
    policy = make_policy(parts, stats=shifted)
    g = torch.Generator().manual_seed(0)
    window = torch.randn(2, WINDOW, dataset.sensor_channels, generator=g) + 3.0  # (B, W, C)
    has = torch.ones(2, dtype=torch.bool)
    pad = torch.tensor([5, 0])
    padded = window.clone()
    padded[0, :5] = 0.0  # what the dataset writes for 5 missing rows
    with_mean = window.clone()
    with_mean[0, :5] = torch.as_tensor(shifted.sensor_mean, dtype=torch.float32)
    with torch.no_grad():
        got = policy.sensor_features(padded, has, pad)
        torch.testing.assert_close(got, policy.sensor_features(with_mean, has))  # padded: the mean
        unaware = policy.sensor_features(padded, has)
    assert (got[0] - unaware[0]).abs().max() > 1e-3  # raw zeros would have read differently
    torch.testing.assert_close(got[1], unaware[1])  # an unpadded window is unchanged


def test_predict_actions_returns_denormalised_chunks(parts):
    bcfg, dataset, stats = parts
    sample = dataset[mixed_indices(dataset)[0]]
    policy = make_policy(parts)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    one = policy.predict_actions(sample["images"], sample["instruction"], sample["sensor_window"], generator=g())
    assert one.shape == (8, 7) and np.isfinite(one).all()
    batched = policy.predict_actions([sample["images"]] * 2, [sample["instruction"]] * 2,
                                     np.stack([sample["sensor_window"]] * 2), generator=g())
    assert batched.shape == (2, 8, 7)
    # Shifting the action mean by +5 shifts every predicted action by +5: outputs are in raw units.
    shifted = dataclasses.replace(stats, action_mean=stats.action_mean + 5.0, action_min=stats.action_min + 5.0,
                                  action_max=stats.action_max + 5.0)
    moved = make_policy(parts, stats=shifted).predict_actions(
        sample["images"], sample["instruction"], sample["sensor_window"], generator=g())
    np.testing.assert_allclose(moved - one, 5.0, atol=1e-4)
