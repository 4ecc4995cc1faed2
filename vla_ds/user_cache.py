"""Where vla_ds keeps what it derives from a dataset: never inside the dataset.

Datasets are often shared, on read-only mounts or in the Hugging Face cache, so training
leaves them byte for byte unchanged. What it derives (the dataset index, the Stage 1 VL
feature cache, unpacked copies of compressed sensor streams) goes under one user cache root:

    $VLA_DS_CACHE                      when set (a shared filesystem on a multi-node cluster)
    $XDG_CACHE_HOME/vla_ds             else
    ~/.cache/vla_ds                    else

Inside it, each dataset gets its own folder named after the dataset folder and a hash of
its resolved path, so two datasets with the same name do not share entries.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ENV_VAR = "VLA_DS_CACHE"


def user_cache_dir() -> Path:
    """The cache root (read from the environment at each call, so a test or a launcher can
    point it elsewhere)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vla_ds"


def dataset_slug(dataset_dir: str | os.PathLike) -> str:
    """``<folder name>-<12 hex of the resolved path's SHA-1>``: one folder per dataset."""
    resolved = Path(dataset_dir).expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    return f"{resolved.name or 'root'}-{digest}"


def feature_cache_dir(dataset_dir: str | os.PathLike) -> Path:
    """The default Stage 1 VL feature cache of a dataset (``cache.dir`` empty)."""
    return user_cache_dir() / "features" / dataset_slug(dataset_dir)


def index_dir(dataset_dir: str | os.PathLike) -> Path:
    """Where a dataset's index lives (one folder per data-config key inside)."""
    return user_cache_dir() / "index" / dataset_slug(dataset_dir)


def unpacked_sensor_dir() -> Path:
    """Where compressed sensor streams are unpacked to (files named by a hash of their path)."""
    return user_cache_dir() / "sensor"
