"""Stage 1 VL feature cache: keys, atomic shards, rebuild of changed entries only, and
the same training losses with and without it."""

import os
import shutil

import numpy as np
import pytest
import torch
from test_stage2 import args  # noqa: E402  (the shared tiny-run argument list)

from vla_ds.data import DataConfig, VLADataset
from vla_ds.data.loading import PolicyCollator
from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder
from vla_ds.training import cache
from vla_ds.training.distributed import init_distributed
from vla_ds.training.metrics import read_metrics
from vla_ds.training.train import build_cache, main


@pytest.fixture()
def setup(tiny_backbone_dir, demo_dataset_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dataset_dir, data)
    bcfg = BackboneConfig(model_name_or_path=str(tiny_backbone_dir), dtype="float32")
    backbone = VLBackbone(bcfg).eval()
    collate = PolicyCollator(VLInputBuilder.from_pretrained(bcfg))
    init_distributed(5)
    return data, bcfg, backbone, collate, tmp_path / "cache"


def build(data, bcfg, backbone, collate, cache_dir, grid=None):
    ds = VLADataset.from_config(DataConfig(dataset_dir=str(data), sensor_window_size=32))
    key, parts = cache.model_key(backbone.fingerprint(), bcfg, torch.float32, grid)
    ccfg = cache.CacheConfig(dir=str(cache_dir), build_batch_size=16, shard_rows=64)
    store = cache.FeatureStore(cache.cache_root(ccfg, str(data), key, parts))
    keys = cache.sample_keys(ds, str(data))
    computed = cache.build(store, [ds], [keys], backbone, collate, ccfg, 0, 0, 1, "cpu", grid=grid)
    return ds, keys, store, computed


def test_tokens_are_cached_in_bfloat16_under_their_own_key(setup):
    """The tokens conditioning stores (T, hidden) per sample as bf16 (half of float32) in its
    own key directory, next to the pooled features: a pooled cache is never read as tokens."""
    data, bcfg, backbone, collate, cache_dir = setup
    ds, keys, pooled, _ = build(data, bcfg, backbone, collate, cache_dir)
    _, _, tokens, computed = build(data, bcfg, backbone, collate, cache_dir, grid=4)
    _, _, coarse, _ = build(data, bcfg, backbone, collate, cache_dir, grid=2)
    assert computed == len(set(keys)) and len({pooled.root, tokens.root, coarse.root}) == 3
    shard = np.load(next(tokens.root.glob("shard-*.npy")), mmap_mode="r")
    assert shard.dtype == np.uint16 and shard.shape[1:] == (2 + 2 * 16, backbone.hidden_size)
    batch = collate([ds[i] for i in (0, 5, 300)])
    with torch.no_grad():
        live = backbone(*(batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")), grid=4)
    cached = np.stack([tokens.get(keys[i]) for i in (0, 5, 300)])
    assert cached.dtype == np.float32 and cached.shape == tuple(live.shape)
    np.testing.assert_array_equal(cached, live.to(torch.bfloat16).float().numpy())  # bf16 rounding, nothing else
    assert coarse.get(keys[0]).shape == (2 + 2 * 4, backbone.hidden_size)
    assert pooled.get(keys[0]).shape == (backbone.hidden_size,)


def test_features_match_the_backbone_and_are_reused(setup):
    data, bcfg, backbone, collate, cache_dir = setup
    ds, keys, store, computed = build(data, bcfg, backbone, collate, cache_dir)
    assert computed == len(set(keys)) == len(store.index)
    assert len(list(store.root.glob("shard-*.npy"))) > 1  # a few large files, not one per sample
    batch = collate([ds[i] for i in (0, 5, 300)])
    with torch.no_grad():
        live = backbone(*(batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")))
    cached = np.stack([store.get(keys[i]) for i in (0, 5, 300)])
    np.testing.assert_allclose(cached, live.numpy(), rtol=1e-4, atol=1e-5)
    assert build(data, bcfg, backbone, collate, cache_dir)[3] == 0  # nothing to recompute


def test_changed_inputs_rebuild_only_their_entries(setup):
    data, bcfg, backbone, collate, cache_dir = setup
    ds, keys, store, _ = build(data, bcfg, backbone, collate, cache_dir)
    image = ds.image_paths(7)[1]
    users = sum(1 for i in range(len(ds)) if image in ds.image_paths(i))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert build(data, bcfg, backbone, collate, cache_dir)[3] == users
    # A new instruction changes every sample of that episode.
    episode = image.parent.parent.parent
    n_episode = sum(1 for i in range(len(ds)) if ds.image_paths(i)[0].parent.parent.parent == episode)
    meta = episode / "metadata.json"
    meta.write_text(meta.read_text().replace('"instruction": "', '"instruction": "carefully '))
    assert build(data, bcfg, backbone, collate, cache_dir)[3] == n_episode
    # Another processor setting is another model key: a separate cache.
    other = BackboneConfig(model_name_or_path=bcfg.model_name_or_path, dtype="float32", max_pixels=56 * 56 * 2)
    key = cache.model_key(backbone.fingerprint(), bcfg, torch.float32)[0]
    assert cache.model_key(backbone.fingerprint(), other, torch.float32)[0] != key
    assert cache.model_key(backbone.fingerprint(), bcfg, torch.bfloat16)[0] != key  # the dtype it runs in


def test_uncommitted_or_inconsistent_shards_are_never_read(setup):
    data, bcfg, backbone, collate, cache_dir = setup
    ds, keys, store, _ = build(data, bcfg, backbone, collate, cache_dir)
    # A crash after writing features but before the commit mark: ignored.
    np.save(store.root / "shard-crash.npy", np.full((3, 64), 7.0, np.float32))
    # A shard whose keys do not match its rows: ignored, even for keys it names.
    np.save(store.root / "shard-bad.npy", np.full((2, 64), 9.0, np.float32))
    (store.root / "shard-bad.keys").write_text(f"{keys[0]}\n{keys[1]}\nextra\n")
    fresh = cache.FeatureStore(store.root).refresh()
    assert len(fresh.index) == len(store.index)
    assert not np.allclose(fresh.get(keys[0]), 9.0)


def test_cached_samples_never_decode_images(setup, monkeypatch):
    data, bcfg, backbone, collate, cache_dir = setup
    ds, keys, store, _ = build(data, bcfg, backbone, collate, cache_dir)
    from vla_ds.data import episodes as episodes_module

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(episodes_module, "decode_image", no_decoding)
    batch = collate([cache.CachedFeatures(ds, keys, store)[i] for i in (1, 2)])
    assert batch[cache.VL_HIDDEN].shape == (2, backbone.hidden_size) and "input_ids" not in batch


def test_same_losses_with_and_without_the_cache(tiny_backbone_dir, demo_dataset_dir, tmp_path):
    common = ["--epochs", "2", "--lr", "1e-3", "--max_steps", "30", "--set", "action_expert.vl_normalize=true"]
    with_cache, without = tmp_path / "cached", tmp_path / "live"
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, with_cache, *common,
                     "--set", f"cache.dir={tmp_path / 'cache'}")) == 0
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, without, *common, "--no-cache")) == 0
    assert any((tmp_path / "cache").rglob("shard-*.keys"))
    a, b = read_metrics(with_cache), read_metrics(without)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        key = "train/loss" if "train/loss" in x else "val/loss"
        assert x[key] == pytest.approx(y[key], rel=2e-2, abs=2e-3), x["step"]
    # Both standardised the VL features with their training split's statistics: from the
    # cache's bf16 features and from the backbone's, the same up to that rounding.
    stats = []
    for run in (with_cache, without):
        module = torch.load(run / "global_step30" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["module"]
        stats.append((module["action_expert.vl_norm.mean"], module["action_expert.vl_norm.std"]))
    (mean, std), (live_mean, live_std) = stats
    assert mean.dtype == torch.float32 and not torch.equal(std, torch.ones_like(std))
    torch.testing.assert_close(live_mean, mean, rtol=0, atol=0.01 * float(mean.abs().max()))
    torch.testing.assert_close(live_std, std, rtol=0.05, atol=1e-3)


def test_vl_feature_stats_are_the_training_features_mean_and_std(setup):
    """What vl_normalize standardises with: each channel's mean and std over the training
    samples and every token place, read from the cache, over a seeded subset when there are
    more than ``max_samples``, and the same from the backbone without a cache."""
    data, bcfg, backbone, collate, cache_dir = setup
    ds, keys, store, _ = build(data, bcfg, backbone, collate, cache_dir, grid=4)
    cached = cache.CachedFeatures(ds, keys, store)
    every = np.stack([store.get(k) for k in keys]).astype(np.float64)  # (N, T, H)
    mean, std, used = cache.vl_feature_stats(cached, None, None, None, 4, seed=0, max_samples=len(ds))
    assert used == len(ds) and mean.shape == std.shape == every.shape[1:]
    channels = every.reshape(-1, every.shape[-1])
    np.testing.assert_allclose(mean, np.broadcast_to(channels.mean(0), mean.shape), rtol=1e-5, atol=1e-6)
    expected = np.maximum(channels.std(0), 0.01 * np.median(channels.std(0)))
    np.testing.assert_allclose(std, np.broadcast_to(expected, std.shape), rtol=1e-4, atol=1e-6)
    # A subset: the seed decides which samples, and the figures are theirs.
    part, _, n = cache.vl_feature_stats(cached, None, None, None, 4, seed=3, max_samples=40)
    again, _, _ = cache.vl_feature_stats(cached, None, None, None, 4, seed=3, max_samples=40)
    other, _, _ = cache.vl_feature_stats(cached, None, None, None, 4, seed=4, max_samples=40)
    chosen = np.sort(np.random.default_rng(3).permutation(len(ds))[:40])
    assert n == 40 and np.array_equal(part, again) and not np.array_equal(part, other)
    np.testing.assert_allclose(part[0], every[chosen].reshape(-1, every.shape[-1]).mean(0), rtol=1e-5, atol=1e-6)
    # Without the cache: the backbone's own features of the same samples (not rounded to bf16).
    live, live_std, _ = cache.vl_feature_stats(ds, backbone, collate, "cpu", 4, seed=3, max_samples=40)
    np.testing.assert_allclose(live, part, atol=0.01 * float(np.abs(part).max()))
    assert not np.array_equal(live, part) and (live_std > 0).all()
    # Pooled: one vector per sample, its channels' figures.
    _, _, pooled, _ = build(data, bcfg, backbone, collate, cache_dir)
    vectors = np.stack([pooled.get(k) for k in keys]).astype(np.float64)
    mean, _, _ = cache.vl_feature_stats(cache.CachedFeatures(ds, keys, pooled), None, None, None, None, seed=0,
                                        max_samples=len(ds))
    np.testing.assert_allclose(mean, vectors.mean(0), rtol=1e-5, atol=1e-6)


def test_stage2_refuses_the_cache(tiny_backbone_dir, demo_dataset_dir, tmp_path, capsys):
    code = main(args("stage2.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "o",
                     "--stage1-checkpoint", str(tmp_path), "--set", "cache.mode=on"))
    err = capsys.readouterr().err
    assert code == 2 and "Stage 1 only" in err and "Traceback" not in err


def test_build_cache_script_fills_the_cache_train_then_reuses(tiny_backbone_dir, demo_dataset_dir, tmp_path, capsys):
    common = ["--set", f"cache.dir={tmp_path / 'cache'}"]
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "b", *common), action=build_cache) == 0
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # built, did not train
    capsys.readouterr()
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "t", *common, "--max_steps", "2")) == 0
    log = capsys.readouterr().err
    assert "computing" not in log and "(0 computed now by this rank)" in log


def _snapshot(root) -> dict:
    """Every file and folder under ``root``, hidden ones too: kind, size, mtime and content hash."""
    import hashlib
    from pathlib import Path

    found = {}
    for path in sorted(Path(root).rglob("*")):
        st = path.lstat()
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return found


def test_training_leaves_the_dataset_byte_for_byte_unchanged(tiny_backbone_dir, demo_dataset_dir, tmp_path,
                                                             monkeypatch):
    """Datasets are shared, on read-only mounts or in the Hugging Face cache: a Stage 1 run with
    the default cache (no cache.dir) writes its VL features and unpacked sensor streams to the
    user cache ($VLA_DS_CACHE), and nothing into the dataset folder."""
    data = tmp_path / "data"
    shutil.copytree(demo_dataset_dir, data)  # nothing of this copy is cached or unpacked yet
    monkeypatch.setenv("VLA_DS_CACHE", str(tmp_path / "user_cache"))
    assert any(np.load(p).get("data") is not None for p in data.rglob("sensor_data.npz"))
    before = _snapshot(data)
    assert main(args("stage1.json", data, tiny_backbone_dir, tmp_path / "out", "--max_steps", "2")) == 0
    assert _snapshot(data) == before
    assert list((tmp_path / "user_cache" / "features").glob("data-*/*/shard-*.keys"))
    assert list((tmp_path / "user_cache" / "sensor").glob("*.sensor_data.*.npy"))  # compressed streams
