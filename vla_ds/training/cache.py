"""Stage 1 VL feature cache: run the frozen backbone once per sample, reuse it every epoch.

In Stage 1 the backbone is frozen, so a sample's VL features depend only on the backbone,
the processor settings, the prompt template, the conditioning (one pooled vector, or
tokens on a g x g grid per view), its images and its instruction.
Those make up the keys, so a stale feature cannot be read:

* the *model key* (one directory per key) hashes the backbone fingerprint (config + base
  weights), its load dtype, ``PROMPT_TEMPLATE_VERSION``, min/max pixels, the
  instruction token budget and the conditioning (``vl_conditioning`` and its grid);
* the *sample key* hashes the instruction, the camera views and, for each view's image
  file, its path, size and modification time.

Layout (a few large files, read through memory mapping)::

    <cache_dir>/<model_key>/
      meta.json                     what the model key was made of (for people)
      shard-<id>.npy                pooled: float32 (n, hidden); tokens: bfloat16 bits as
                                    uint16 (n, T, hidden), half the disk of float32
      shard-<id>.keys               n sample keys, one per line: written last, the commit mark

A shard is written to temporary names and renamed, ``.npy`` first and ``.keys`` last, so
a crash mid-build leaves at most an unreferenced ``.npy`` (ignored) and never an entry
that reads back wrong; a restarted build keeps every committed shard. Changing an input
changes its sample key, so only the affected entries are computed again.

The backbone, the data and the engine meet here, so this module sits above all three.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ds.batch import SAMPLE_INDEX, VL_HIDDEN, VL_INPUT_KEYS
from vla_ds.errors import ConfigError, DatasetError
from vla_ds.user_cache import feature_cache_dir

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_MODES = ("auto", "on", "off")


@dataclass
class CacheConfig:
    """VL feature cache (SPEC section 2: on in Stage 1, off in Stage 2).

    Fields:
        mode: ``auto`` (on in Stage 1, off in Stage 2), ``on`` (Stage 1 only) or ``off``
            (``--no-cache``).
        dir: cache root; empty means the dataset's folder in the user cache
            (``$VLA_DS_CACHE/features/<dataset>-<hash>``, else ``~/.cache/vla_ds/...``:
            :mod:`vla_ds.user_cache`), never the dataset itself. Multi-node runs put it (or
            ``$VLA_DS_CACHE``) on a filesystem every node sees.
        build_batch_size: samples per backbone forward while building.
        shard_rows: rows per shard file; a crash loses at most one unfinished shard per rank.
    """

    mode: str = "auto"
    dir: str = ""
    build_batch_size: int = 16
    shard_rows: int = 4096

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ConfigError(f"cache.mode={self.mode!r}: expected one of {', '.join(CACHE_MODES)}")
        if self.build_batch_size < 1 or self.shard_rows < 1:
            raise ConfigError("cache.build_batch_size and cache.shard_rows must be >= 1")


def model_key(fingerprint: str, backbone_config, run_dtype: torch.dtype,
              grid: int | None = None) -> tuple[str, dict[str, Any]]:
    """(key, its parts) for a backbone, the dtype it runs in (the engine may cast it), its
    input settings and what is stored: one pooled vector (``grid`` None) or tokens on a
    ``grid`` x ``grid`` grid per view."""
    from vla_ds.models.backbone import PROMPT_TEMPLATE_VERSION

    parts = {
        "format": CACHE_FORMAT_VERSION,
        "backbone_fingerprint": fingerprint,
        "dtype": str(run_dtype).removeprefix("torch."),
        "attn_implementation": backbone_config.attn_implementation,
        "prompt_template": PROMPT_TEMPLATE_VERSION,
        "min_pixels": backbone_config.min_pixels,
        "max_pixels": backbone_config.max_pixels,
        "max_text_tokens": backbone_config.max_text_tokens,
        "vl_conditioning": "pooled" if grid is None else "tokens",
    }
    if grid is not None:
        parts["vl_grid"] = grid
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return digest, parts


def sample_keys(dataset, dataset_dir: str) -> list[str]:
    """One key per sample: instruction, views, and each view's file (relative to the dataset
    dir, so nodes that mount it elsewhere agree), size and mtime, plus the frame's place in
    the file for a video (its time) or a parquet of images: a changed file recomputes."""
    root = Path(dataset_dir).resolve()
    stat_cache: dict[Path, tuple[int, int]] = {}

    def identity(path: Path) -> tuple[str, int, int]:
        if path not in stat_cache:
            st = path.stat()
            stat_cache[path] = (st.st_size, st.st_mtime_ns)
        resolved = path.resolve()
        rel = resolved.relative_to(root) if resolved.is_relative_to(root) else resolved
        return (str(rel), *stat_cache[path])

    keys = []
    for i in range(len(dataset)):
        sources = dataset.view_sources(i)  # [(view, file, locator)]
        ident = [dataset.instruction(i), [view for view, _, _ in sources],
                 [identity(path) + ((locator,) if locator else ()) for _, path, locator in sources]]
        keys.append(hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32])
    return keys


class FeatureStore:
    """The committed shards of one model key: key -> feature row, memory-mapped.

    Picklable for DataLoader workers: the memory maps are reopened lazily in each worker
    (the OS shares their pages, nothing is copied per worker).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index: dict[str, tuple[int, int]] = {}
        self.shards: list[str] = []
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def refresh(self) -> "FeatureStore":
        """Re-read the committed shards (after a build)."""
        self.index, self.shards, self._maps = {}, [], {}
        for keys_file in sorted(self.root.glob("shard-*.keys")):
            npy = keys_file.with_suffix(".npy")
            keys = keys_file.read_text().split()
            if not npy.is_file():
                logger.warning("%s: committed keys without features; ignored", keys_file)
                continue
            rows = np.load(npy, mmap_mode="r").shape[0]
            if rows != len(keys):
                logger.warning("%s: %d features for %d keys; ignored", npy, rows, len(keys))
                continue
            shard = len(self.shards)
            self.shards.append(npy.name)
            for row, key in enumerate(keys):
                self.index[key] = (shard, row)
        return self

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> np.ndarray:
        """The sample's features as float32: (hidden,) pooled or (T, hidden) tokens (a copy)."""
        shard, row = self.index[key]
        if shard not in self._maps:
            self._maps[shard] = np.load(self.root / self.shards[shard], mmap_mode="r")
        return from_stored(self._maps[shard][row])


class ShardWriter:
    """Buffers features and commits them as shards (atomic: see the module docstring)."""

    def __init__(self, root: Path, shard_rows: int, rank: int):
        self.root, self.shard_rows, self.rank = root, shard_rows, rank
        self.keys: list[str] = []
        self.rows: list[np.ndarray] = []
        self.written = 0

    def add(self, keys: list[str], features: np.ndarray) -> None:
        self.keys.extend(keys)
        self.rows.extend(features)
        if len(self.keys) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        name = f"shard-r{self.rank}-{uuid.uuid4().hex[:12]}"
        npy, keys = self.root / f"{name}.npy", self.root / f"{name}.keys"
        tmp_npy, tmp_keys = self.root / f".{name}.npy.tmp", self.root / f".{name}.keys.tmp"
        with open(tmp_npy, "wb") as f:
            np.save(f, to_stored(np.stack(self.rows)))
            f.flush()
            os.fsync(f.fileno())
        with open(tmp_keys, "w") as f:
            f.write("\n".join(self.keys) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_npy, npy)
        os.replace(tmp_keys, keys)  # the commit: only now do readers see the shard
        self.written += len(self.keys)
        self.keys, self.rows = [], []


def to_stored(features: np.ndarray) -> np.ndarray:
    """float32 features as a shard stores them: pooled (n, hidden) as float32; tokens
    (n, T, hidden) as bfloat16 (round to nearest even) in uint16, which numpy can map."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim == 2:
        return features
    return torch.from_numpy(features).to(torch.bfloat16).view(torch.uint16).numpy()


def from_stored(row: np.ndarray) -> np.ndarray:
    """One stored row back as float32 (a copy; bfloat16 widens exactly)."""
    if row.dtype == np.uint16:
        return torch.from_numpy(np.array(row)).view(torch.bfloat16).float().numpy()
    return np.array(row, dtype=np.float32)


def cache_base(cache_config: CacheConfig, dataset_dir: str) -> Path:
    """The folder holding a dataset's caches, one per model key: ``cache.dir`` or the
    dataset's folder in the user cache."""
    return Path(cache_config.dir) if cache_config.dir else feature_cache_dir(dataset_dir)


def cache_root(cache_config: CacheConfig, dataset_dir: str, key: str, parts: dict[str, Any]) -> Path:
    base = cache_base(cache_config, dataset_dir)
    old = Path(dataset_dir) / ".vla_ds_cache"
    if not cache_config.dir and old.is_dir():  # where the cache lived before vla_ds left datasets alone
        logger.info("%s holds a VL feature cache from an older vla_ds, no longer read: the cache is now %s (delete "
                    "the old one, or reuse it with --set cache.dir=%s)", old, base, old)
    root = base / key
    try:
        root.mkdir(parents=True, exist_ok=True)
        meta = root / "meta.json"
        if not meta.exists():
            tmp = root / f".meta.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text(json.dumps(parts, indent=2) + "\n")
            os.replace(tmp, meta)
    except OSError as e:
        raise ConfigError(f"{base}: cannot write the VL feature cache ({e.strerror}); "
                          "point --set cache.dir=DIR at a writable place or pass --no-cache") from None
    return root


def backbone_features(backbone, loader, device, grid: int | None):
    """(sample indices, float32 features (B, hidden) / (B, T, hidden)) of each batch of ``loader``
    that has samples (one of only bad samples has none), with ``backbone`` in eval mode."""
    was_training = backbone.training
    backbone.eval()
    try:
        for batch in loader:
            if SAMPLE_INDEX in batch:
                inputs = [batch[k].to(device) for k in VL_INPUT_KEYS]
                yield batch[SAMPLE_INDEX], backbone(*inputs, grid=grid).float().cpu().numpy()
    finally:
        backbone.train(was_training)


@torch.no_grad()
def build(store: FeatureStore, datasets: list, keys: list[list[str]], backbone, collate, cache_config: CacheConfig,
          num_workers: int, rank: int, world_size: int, device, on_bad_sample: str = "error",
          grid: int | None = None) -> int:
    """Compute the features of every sample whose key is missing (``grid``: as
    ``VLBackbone.forward`` takes it). Collective: each rank takes a disjoint share, then all
    ranks wait and re-read the store. Returns the number of features this rank computed.
    With ``on_bad_sample="skip"`` a sample that cannot be loaded gets no feature (training
    then skips it and counts it)."""
    import deepspeed.comm as dist
    from torch.utils.data import DataLoader, Subset

    from vla_ds.data.loading import LoaderDataset
    from vla_ds.training.distributed import long_phase

    store.refresh()
    missing: dict[str, tuple[int, int]] = {}  # key -> (dataset, index); one job per distinct key
    for d, ds_keys in enumerate(keys):
        for i, k in enumerate(ds_keys):
            if k not in store and k not in missing:
                missing[k] = (d, i)
    dist.barrier()  # every rank has read the same index before anyone writes: the same job split
    jobs = list(missing.items())[rank::world_size]
    writer = ShardWriter(store.root, cache_config.shard_rows, rank)
    # Hours for a big dataset with the 3B backbone: not bounded by the collective timeout.
    with long_phase("VL feature cache build"):
        if jobs:
            logger.info("VL feature cache: computing %d of %d missing features on this rank (%s)",
                        len(jobs), len(missing), store.root)
            for d, ds in enumerate(datasets):
                mine = [(k, i) for k, (dd, i) in jobs if dd == d]
                if not mine:
                    continue
                key_of = dict((i, k) for k, i in mine)
                loader = DataLoader(Subset(LoaderDataset(ds, on_bad_sample), [i for _, i in mine]),
                                    batch_size=cache_config.build_batch_size, collate_fn=collate, num_workers=num_workers)
                for indices, features in backbone_features(backbone, loader, device, grid):
                    writer.add([key_of[i] for i in indices], features)  # bad samples were dropped
            writer.flush()
    store.refresh()
    still = sum(1 for ds_keys in keys for k in ds_keys if k not in store)
    if still and on_bad_sample == "skip":
        logger.warning("VL feature cache: %d sample(s) have no feature (bad samples, skipped and counted in "
                       "training)", still)
    elif still:
        raise ConfigError(f"{store.root}: {still} VL features are missing after every rank built its share; "
                          "with several nodes the cache must be on a filesystem they all see "
                          "(--set cache.dir=DIR), or pass --no-cache")
    return writer.written


class CachedFeatures(torch.utils.data.Dataset):
    """A dataset whose samples carry their cached VL feature instead of images."""

    def __init__(self, dataset, keys: list[str], store: FeatureStore):
        self.dataset, self.keys, self.store = dataset, keys, store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        if key not in self.store:
            # Only a sample the build could not load (on_bad_sample="skip") lacks a feature:
            # loading it again raises its DatasetError, which the loader counts as bad.
            self.dataset.get_item(i)
            raise DatasetError(f"{self.store.root}: no cached VL feature for {self.dataset.describe_sample(i)}; "
                               "rebuild the cache (scripts/build_cache.py) or pass --no-cache")
        sample = self.dataset.get_item(i, with_images=False)  # never decodes images
        sample[VL_HIDDEN] = self.store.get(key)
        return sample

    def describe_sample(self, i: int) -> str:
        return self.dataset.describe_sample(i)


VL_STATS_SAMPLES = 1024  # training samples the VL feature statistics are estimated from


@torch.no_grad()
def vl_feature_stats(dataset, backbone, collate, device, grid: int | None, seed: int, num_workers: int = 0,
                     max_samples: int = VL_STATS_SAMPLES) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and standard deviation of each VL channel over up to ``max_samples`` random samples
    of ``dataset`` (the training split), over every token place (tokens) or of the one pooled
    vector: read from the cache when it is one (:class:`CachedFeatures`), else computed with
    ``backbone``. Returned in the features' shape ((T, H) tokens: the same figures at every
    place, whose own offsets stay, telling the places apart), with the samples used. A channel
    that barely varies gets 1% of the median spread as its std, so that its rounding noise is
    not blown up to the scale of the channels that carry signal."""
    from torch.utils.data import DataLoader, Subset

    from vla_ds.data.loading import LoaderDataset

    chosen = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_samples])
    total = total_sq = None
    used, shape = 0, None

    def add(features: np.ndarray) -> None:
        nonlocal total, total_sq, used, shape
        shape = features.shape[1:]
        rows = features.astype(np.float64).reshape(-1, features.shape[-1])  # every place's rows of a channel
        total = rows.sum(0) if total is None else total + rows.sum(0)
        total_sq = (rows ** 2).sum(0) if total_sq is None else total_sq + (rows ** 2).sum(0)
        used += len(features)

    if isinstance(dataset, CachedFeatures):
        keys = [dataset.keys[i] for i in chosen if dataset.keys[i] in dataset.store]  # bad samples have none
        for start in range(0, len(keys), 256):
            add(np.stack([dataset.store.get(k) for k in keys[start:start + 256]]))
    else:
        loader = DataLoader(Subset(LoaderDataset(dataset, "skip"), chosen.tolist()), batch_size=16,
                            collate_fn=collate, num_workers=num_workers)
        for _, features in backbone_features(backbone, loader, device, grid):
            add(features)
    if not used:
        raise DatasetError("no training sample could be read to estimate the VL feature statistics")
    rows = used * int(np.prod(shape[:-1]))
    mean = total / rows
    std = np.sqrt(np.maximum(total_sq / rows - mean ** 2, 0.0))
    std = np.maximum(std, 0.01 * float(np.median(std)) + 1e-12)
    return (np.broadcast_to(mean, shape).astype(np.float32), np.broadcast_to(std, shape).astype(np.float32), used)
