"""VLAPolicy.from_pretrained (docs/policy_format.md) and scripts/predict.py, on the tiny backbone.

Policy directories are written by tests/policy_helpers.py from in-memory policies, so a
loaded policy can be compared with the one it was written from.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from policy_helpers import build_policy, write_policy_dir
from safetensors.torch import load_file, save_file

from vla_ds.data import DataConfig, VLADataset, compute_norm_stats
from vla_ds.data.loading import PolicyCollator
from vla_ds.errors import CheckpointError
from vla_ds.models.backbone import BackboneConfig, VLBackbone
from vla_ds.models.finetune import FinetuneConfig
from vla_ds.models.policy import VLAPolicy, state_dict_problems
from vla_ds.models.tiny_backbone import make_tiny_backbone
from vla_ds.policy_tools import predict as predict_cli

STEPS = 3  # DDIM steps: enough to exercise the sampler, cheap on CPU
LORA = FinetuneConfig(mode="lora", lora_r=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def parts(tiny_backbone_dir, demo_dataset_dir):
    dataset = VLADataset.from_config(DataConfig(dataset_dir=str(demo_dataset_dir), sensor_window_size=32))
    return tiny_backbone_dir, dataset, compute_norm_stats(dataset)


@pytest.fixture(scope="module")
def lora_policy(parts):
    backbone_dir, dataset, stats = parts
    return build_policy(backbone_dir, stats, dataset.sensor_channels, finetune=LORA, seed=1)


@pytest.fixture(scope="module")
def lora_dir(lora_policy, tmp_path_factory):
    return write_policy_dir(lora_policy, tmp_path_factory.mktemp("lora") / "policy", stage="stage2", merged=True)


def samples(dataset, n=3):
    """A sample with sensor data, one without, and one more with."""
    has = [i for i in range(len(dataset)) if dataset.get_item(i, with_images=False)["has_sensor"]]
    hasnt = [i for i in range(len(dataset)) if i not in set(has)]
    return [dataset[i] for i in (has[0], hasnt[0], has[5])[:n]]


def predict(policy, batch, seed=7):
    """Batched predict_actions with per-sample has_sensor and a fixed generator."""
    return policy.predict_actions([s["images"] for s in batch], [s["instruction"] for s in batch],
                                  np.stack([s["sensor_window"] for s in batch]), num_inference_steps=STEPS,
                                  generator=torch.Generator().manual_seed(seed),
                                  has_sensor=[s["has_sensor"] for s in batch])


def features(policy, batch):
    collated = PolicyCollator(policy.input_builder)(batch)
    with torch.no_grad():
        return policy.vl_features(collated)


def test_round_trip_gives_the_same_actions(parts, tmp_path):
    backbone_dir, dataset, stats = parts
    policy = build_policy(backbone_dir, stats, dataset.sensor_channels)
    out = write_policy_dir(policy, tmp_path / "policy")
    rng_before = torch.random.get_rng_state()
    loaded = VLAPolicy.from_pretrained(out)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # loading never moves the caller's RNG
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.policy_config["format"] == "vla_ds-policy"
    batch = samples(dataset)
    expected = predict(policy, batch)
    got = predict(loaded, batch)
    assert got.shape == (3, 8, 7) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Single form (its noise is drawn for one sample, so compare single with single).
    one = [p.predict_actions(batch[0]["images"], batch[0]["instruction"], batch[0]["sensor_window"],
                             num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7))
           for p in (policy, loaded)]
    assert one[1].shape == (8, 7)
    np.testing.assert_allclose(one[1], one[0], atol=1e-5)


@pytest.mark.parametrize("objective, prediction_type", [("diffusion", "sample"), ("flow_matching", "epsilon"),
                                                        ("regression", "epsilon")])
def test_every_head_type_round_trips(parts, tmp_path, objective, prediction_type):
    backbone_dir, dataset, stats = parts
    policy = build_policy(backbone_dir, stats, dataset.sensor_channels, objective=objective,
                          prediction_type=prediction_type)
    loaded = VLAPolicy.from_pretrained(write_policy_dir(policy, tmp_path / "policy"))
    assert (loaded.action_expert.config.objective, loaded.action_expert.config.prediction_type) == \
        (objective, prediction_type)
    batch = samples(dataset)
    got = predict(loaded, batch)
    assert got.shape == (3, 8, 7) and np.isfinite(got).all()
    np.testing.assert_allclose(got, predict(policy, batch), atol=1e-5)


def test_chunks_stay_in_the_training_range(parts, tmp_path):
    """The recorded range travels in norm_stats.json and bounds every sampled chunk; a
    dimension that never moved in training is predicted exactly."""
    backbone_dir, dataset, stats = parts
    assert stats.action_min is not None
    still = dataclasses.replace(stats, action_min=stats.action_min.copy(), action_max=stats.action_max.copy())
    still.action_min[3] = still.action_max[3] = still.action_mean[3]  # as if da never moved
    policy = build_policy(backbone_dir, still, dataset.sensor_channels)
    loaded = VLAPolicy.from_pretrained(write_policy_dir(policy, tmp_path / "policy"))
    got = predict(loaded, samples(dataset))
    assert (got >= stats.action_min.astype(np.float32) - 1e-4).all()
    assert (got <= stats.action_max.astype(np.float32) + 1e-4).all()
    np.testing.assert_allclose(got[..., 3], still.action_mean[3], atol=1e-5)


def test_a_policy_written_before_heads_were_configurable_loads(parts, tmp_path):
    """Format version 1: no objective or conditioning in config.json, no action range in
    norm_stats.json. It is the DDPM epsilon head on the pooled VL vector, sampled as before
    (clamped to +-clip_sample)."""
    backbone_dir, dataset, stats = parts
    policy = build_policy(backbone_dir, stats, dataset.sensor_channels, vl_conditioning="pooled")
    out = write_policy_dir(policy, tmp_path / "policy")
    config = json.loads((out / "config.json").read_text())
    config["format_version"] = 1
    for key in ("objective", "prediction_type", "clip_to_data_range", "flow_beta_alpha", "flow_beta_beta",
                "snr_gamma", "vl_conditioning", "vl_grid", "num_views", "vl_attention"):
        config["action_expert"].pop(key)
    (out / "config.json").write_text(json.dumps(config))
    norm = json.loads((out / "norm_stats.json").read_text())
    (out / "norm_stats.json").write_text(json.dumps({k: v for k, v in norm.items() if k not in ("action_min", "action_max")}))
    loaded = VLAPolicy.from_pretrained(out)
    assert (loaded.action_expert.config.objective, loaded.action_expert.config.prediction_type) == \
        ("diffusion", "epsilon")
    assert loaded.action_expert.config.vl_conditioning == "pooled" and loaded.action_expert.vl_embed is None
    assert loaded.action_norm.normalized_range() is None
    assert np.isfinite(predict(loaded, samples(dataset))).all()


@pytest.mark.parametrize("conditioning", ["pooled", "tokens"])
def test_both_conditionings_round_trip_and_a_mismatch_is_refused(parts, tmp_path, conditioning):
    """A policy reads what it was trained on; config.json naming the other conditioning does
    not match the weights and is refused in one line naming the file and the tensor."""
    backbone_dir, dataset, stats = parts
    policy = build_policy(backbone_dir, stats, dataset.sensor_channels, vl_conditioning=conditioning)
    out = write_policy_dir(policy, tmp_path / "policy")
    loaded = VLAPolicy.from_pretrained(out)
    batch = samples(dataset)
    np.testing.assert_allclose(predict(loaded, batch), predict(policy, batch), atol=1e-5)
    vl = features(loaded, batch)
    assert vl.shape == ((3, 64) if conditioning == "pooled" else (3, 2 + 2 * 16, 64))
    if conditioning == "tokens":
        with pytest.raises(ValueError, match="1 camera views, but this policy reads 2"):
            loaded.predict_actions([s["images"][:1] for s in batch], [s["instruction"] for s in batch])
    config = json.loads((out / "config.json").read_text())
    config["action_expert"]["vl_conditioning"] = "tokens" if conditioning == "pooled" else "pooled"
    (out / "config.json").write_text(json.dumps(config))
    trained = "VL tokens" if conditioning == "tokens" else "the pooled VL vector"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors does not match .*the weights were trained on "
                                              rf"{trained}; config.json says action_expert.vl_conditioning") as e:
        VLAPolicy.from_pretrained(out)
    assert "\n" not in str(e.value)


def test_a_newer_policy_format_is_refused(parts, tmp_path):
    backbone_dir, dataset, stats = parts
    out = write_policy_dir(build_policy(backbone_dir, stats, dataset.sensor_channels), tmp_path / "policy")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        VLAPolicy.from_pretrained(out)


def test_lora_adapter_features_equal_the_in_memory_model(parts, lora_policy, lora_dir):
    backbone_dir, dataset, stats = parts
    loaded = VLAPolicy.from_pretrained(lora_dir, vl_model=backbone_dir)  # vl_model given: base + adapter/
    assert hasattr(loaded.backbone.model, "peft_config")
    batch = samples(dataset)
    expected = features(lora_policy, batch)
    torch.testing.assert_close(features(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(predict(loaded, batch), predict(lora_policy, batch), atol=1e-4)
    # The adapter matters: the same base without it gives other features.
    base = build_policy(backbone_dir, stats, dataset.sensor_channels)
    assert (features(base, batch) - expected).abs().max() > 1e-3


def test_merged_backbone_equals_the_adapter(parts, lora_dir):
    backbone_dir, dataset, _ = parts
    with_adapter = VLAPolicy.from_pretrained(lora_dir, vl_model=backbone_dir)
    merged = VLAPolicy.from_pretrained(lora_dir)  # merged_backbone/ is used when no vl_model is given
    assert not hasattr(merged.backbone.model, "peft_config")
    assert merged.input_builder is not None
    batch = samples(dataset)
    torch.testing.assert_close(features(merged, batch), features(with_adapter, batch), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(predict(merged, batch), predict(with_adapter, batch), atol=1e-3)


def test_full_finetune_layers_load_from_model_safetensors(parts, tmp_path):
    backbone_dir, dataset, stats = parts
    policy = build_policy(backbone_dir, stats, dataset.sensor_channels,
                          finetune=FinetuneConfig(mode="full", unfreeze_last_n=1))
    last = policy.backbone.vl_model.language_model.layers[-1]
    with torch.no_grad():
        last.mlp.down_proj.weight.add_(0.05)  # "trained" layer: differs from the base checkpoint
    out = write_policy_dir(policy, tmp_path / "policy", stage="stage2")
    loaded = VLAPolicy.from_pretrained(out)
    batch = samples(dataset, 2)
    torch.testing.assert_close(features(loaded, batch), features(policy, batch), atol=1e-5, rtol=1e-5)
    # Without the trained layer the directory is incomplete.
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("backbone.")}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*language_model.layers"):
        VLAPolicy.from_pretrained(out)


@pytest.fixture
def heads_dir(parts, tmp_path):
    backbone_dir, dataset, stats = parts
    return write_policy_dir(build_policy(backbone_dir, stats, dataset.sensor_channels), tmp_path / "policy")


def test_refuses_a_directory_without_norm_stats(heads_dir):
    (heads_dir / "norm_stats.json").unlink()
    with pytest.raises(CheckpointError, match="norm_stats.json is missing") as err:
        VLAPolicy.from_pretrained(heads_dir)
    assert str(heads_dir) in str(err.value)


def test_refuses_another_backbone(heads_dir, tmp_path):
    other = make_tiny_backbone(tmp_path / "other_backbone", seed=1)
    stored = json.loads((heads_dir / "config.json").read_text())["backbone"]["fingerprint"]
    with pytest.raises(CheckpointError) as err:
        VLAPolicy.from_pretrained(heads_dir, vl_model=other)
    actual = VLBackbone(BackboneConfig(model_name_or_path=str(other), dtype="float32")).fingerprint()
    assert actual != stored
    message = str(err.value)
    assert stored in message and actual in message and str(other) in message and str(heads_dir) in message


def test_refuses_a_tensor_of_another_shape(heads_dir):
    path = heads_dir / "model.safetensors"
    tensors = load_file(str(path))
    key = "action_expert.head.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"action_expert\.head\.weight is \(7, 65\) in the file but \(7, 64\)"):
        VLAPolicy.from_pretrained(heads_dir)


def test_state_dict_problems_names_missing_unknown_and_non_finite():
    own = {"action_expert.a": torch.zeros(2), "action_expert.b": torch.zeros(3), "backbone.x": torch.zeros(1)}
    saved = {"action_expert.a": torch.tensor([1.0, float("nan")]), "extra.w": torch.zeros(1)}
    problems = "; ".join(state_dict_problems(saved, own, ("action_expert.",)))
    assert "1 tensors missing (action_expert.b)" in problems
    assert "1 unknown tensors (extra.w)" in problems
    assert "NaN/inf (action_expert.a)" in problems
    assert state_dict_problems({"action_expert.a": torch.ones(2), "action_expert.b": torch.ones(3)}, own,
                               ("action_expert.",)) == []


def test_refuses_lora_config_without_adapter(lora_dir, tmp_path, parts):
    import shutil

    copy = tmp_path / "no_adapter"
    shutil.copytree(lora_dir, copy)
    shutil.rmtree(copy / "adapter")
    with pytest.raises(CheckpointError, match="no adapter/"):
        VLAPolicy.from_pretrained(copy, vl_model=parts[0])


# --------------------------------------------------------------------------- scripts/predict.py


def test_predict_script_prints_the_chunk_and_the_recording(lora_dir, demo_dataset_dir, capsys):
    predict_script = predict_cli
    episode = demo_dataset_dir / "Needle_insertion_eye_trocar" / "episode_000"
    assert predict_script.main(["--policy", str(lora_dir), "--episode", str(episode), "--frame", "2",
                                "--steps", "2", "--seed", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("dx", "dy", "dz", "da", "db", "dr", "gripper", "[mm]", "[deg]"):
        assert name in out
    predicted = [line for line in out.splitlines() if "predicted" in line]
    recorded = [line for line in out.splitlines() if line.strip().startswith("recorded")]
    assert len(predicted) == 8 and len(recorded) == 8
    values = np.array([[float(x) for x in line.split()[2:]] for line in predicted])
    assert values.shape == (8, 7) and np.isfinite(values).all()


def test_predict_script_reports_a_bad_frame_in_one_line(lora_dir, demo_dataset_dir, capsys):
    predict_script = predict_cli
    episode = demo_dataset_dir / "Needle_insertion_eye_trocar" / "episode_000"
    assert predict_script.main(["--policy", str(lora_dir), "--episode", str(episode), "--frame", "100000",
                                "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --frame 100000") and "samples" in err[-1]
    assert predict_script.main(["--policy", str(lora_dir / "nope"), "--episode", str(episode)]) == 2
    assert "policy directory does not exist" in capsys.readouterr().err
