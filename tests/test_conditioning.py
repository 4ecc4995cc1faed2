"""Where things are: the tokens conditioning lets the action expert learn a chunk that is a
function of where a square sits in the image; the pooled vector (the guide's head) cannot.

The position task of ``vla_ds.data.synthetic`` read through the dataset code, features from
the tiny backbone as the Stage 1 cache computes them, and the default head (DDPM, sample
prediction) trained on them directly: held-out error against the mean-action baseline.
The full pipeline's figures are in docs/conditioning.md (benchmarks/bench_learning.py).
"""

import dataclasses

import numpy as np
import pytest
import torch

from vla_ds.data import DataConfig, VLADataset, split_train_val
from vla_ds.data.loading import PolicyCollator
from vla_ds.data.synthetic import make_learning_dataset
from vla_ds.models.action_expert import ActionExpert, ActionExpertConfig
from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder
from vla_ds.training.config import MODEL_PRESETS

STEPS = 800


@pytest.fixture(scope="module")
def position_features(tiny_backbone_dir, tmp_path_factory):
    """(train, val) of (pooled (N, H), tokens (N, T, H), first action step's dx, dy (N, 2))."""
    data = make_learning_dataset(tmp_path_factory.mktemp("position") / "data", "position", episodes=120)
    dataset = VLADataset.from_config(DataConfig(dataset_dir=str(data), sensor_window_size=4))
    bcfg = BackboneConfig(model_name_or_path=str(tiny_backbone_dir), dtype="float32")
    backbone = VLBackbone(bcfg).eval()
    collate = PolicyCollator(VLInputBuilder.from_pretrained(bcfg))
    train, val = split_train_val(dataset, 0.2, 0)

    def features(ds):
        pooled, tokens, actions = [], [], []
        for start in range(0, len(ds), 64):
            batch = collate([ds[i] for i in range(start, min(start + 64, len(ds)))])
            inputs = [batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")]
            with torch.no_grad():
                pooled.append(backbone(*inputs))
                tokens.append(backbone(*inputs, grid=4))
            actions.append(batch["actions"][:, :, :2])  # dx, dy; the other dimensions never move
        return torch.cat(pooled), torch.cat(tokens), torch.cat(actions)

    return features(train), features(val)


def _held_out_ratio(conditioning: str, position_features) -> float:
    (pooled, tokens, actions), (val_pooled, val_tokens, val_actions) = position_features
    mean, std = actions.mean((0, 1)), actions.std((0, 1))
    config = dataclasses.replace(
        ActionExpertConfig(**MODEL_PRESETS["tiny"]["action_expert"]), action_dim=2, horizon=actions.shape[1],
        vl_hidden_size=pooled.shape[1], sensor_feature_dim=4, vl_conditioning=conditioning, vl_grid=4, num_views=2)
    vl, val_vl = (pooled, val_pooled) if conditioning == "pooled" else (tokens, val_tokens)
    torch.manual_seed(0)
    model = ActionExpert(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = (actions - mean) / std
    pad, g = torch.zeros(32, config.horizon, dtype=torch.bool), torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        idx = torch.randint(0, len(vl), (32,), generator=g)
        loss, _ = model.compute_loss(target[idx], pad, torch.ones(32), vl[idx], torch.zeros(32, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = model.sample(val_vl, torch.zeros(len(val_vl), 4), generator=torch.Generator().manual_seed(1)) * std + mean
    baseline = ((val_actions - mean) ** 2).mean()
    return float(((out - val_actions) ** 2).mean() / baseline)


def test_tokens_learn_where_the_square_is_and_the_pooled_vector_cannot(position_features):
    tokens, pooled = _held_out_ratio("tokens", position_features), _held_out_ratio("pooled", position_features)
    print(f"position task, held-out MSE / mean baseline: tokens {tokens:.3f}, pooled {pooled:.3f}")
    assert tokens < 0.5, tokens       # well below always predicting the mean action (0.33 measured)
    assert pooled > 0.9, pooled       # nothing in one mean over the tokens says where (1.76)
    assert np.isfinite([tokens, pooled]).all()
