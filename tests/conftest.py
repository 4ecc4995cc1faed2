"""Shared fixtures: the tiny offline backbone and the demo dataset, made once per session.

DeepSpeed JIT-builds its C++ ops (fused Adam, the CPU shm comm op) on first use; every
test process, launcher children included, shares one TORCH_EXTENSIONS_DIR so each op is
built once per machine, not once per test.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    from vla_ds.tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone") / "qwen25vl_tiny")


@pytest.fixture(scope="session")
def demo_dataset_dir(tmp_path_factory) -> Path:
    from vla_ds.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "dataset")
