"""Shared fixtures: the tiny offline backbone and the demo dataset, made once per session.

DeepSpeed JIT-builds its C++ ops (fused Adam, the CPU shm comm op) on first use; every
test process, launcher children included, shares one TORCH_EXTENSIONS_DIR so each op is
built once per machine, not once per test.

Two start-up costs that say nothing about vla_ds are paid once per session, not per run:

- py-cpuinfo's answer (DeepSpeed asks it at every op load and every DeepSpeedCPUAdam, and
  each question costs ~1.2 s of busy CPU): asked once, then served from a file, in this
  process and, through tests/launched_site/sitecustomize.py, in every process a test starts;
- the garbage collector's walk over the objects of the imported libraries (torch,
  DeepSpeed, transformers: ~0.25 s per full collection, and DeepSpeed's BF16_Optimizer
  collects four times per engine): they are moved out of its way with ``gc.freeze()``,
  once after collection and again at the start of each test module.
"""

import gc
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCHED_SITE = Path(__file__).resolve().parent / "launched_site"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session", autouse=True)
def user_cache_in_tmp(tmp_path_factory):
    """vla_ds's user cache (the Stage 1 feature cache's default home, unpacked sensor
    streams) in a session folder, for this process and every process a test starts: not the
    user's ~/.cache, and shared by the tests like the session's datasets."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLA_DS_CACHE", str(tmp_path_factory.mktemp("vla_ds_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def cpu_info_asked_once(tmp_path_factory):
    """py-cpuinfo asked at most once per session (see tests/launched_site/sitecustomize.py),
    by this process or by the first process a test starts."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("vla_ds_test_launched_site", LAUNCHED_SITE / "sitecustomize.py")
    site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(site)
    path = str(tmp_path_factory.mktemp("cpu_info") / "cpu_info.json")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLA_DS_TEST_CPU_INFO", path)
    mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(LAUNCHED_SITE), os.environ.get("PYTHONPATH")) if p))
    cpuinfo = None
    if importlib.util.find_spec("cpuinfo") is not None:
        import cpuinfo

        real = site.patch_cpuinfo(cpuinfo, path)
    yield path
    mp.undo()
    if cpuinfo is not None:
        cpuinfo.get_cpu_info = real
        if "cpuinfo.cpuinfo" in sys.modules:
            sys.modules["cpuinfo.cpuinfo"].get_cpu_info = real


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module", autouse=True)
def _gc_freeze_what_is_alive():
    """Collect the previous module's garbage, then freeze what is still alive (libraries
    imported since, session fixtures): later collections walk only this module's objects."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    from vla_ds.models.tiny_backbone import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone") / "qwen25vl_tiny")


@pytest.fixture(scope="session")
def demo_dataset_dir(tmp_path_factory) -> Path:
    from vla_ds.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "dataset")


def stage1_flags(dataset, backbone, out, *extra) -> list[str]:
    """scripts/train.py's flags for a tiny Stage 1 run (ds_configs/stage1.json, micro batch 8)."""
    return ["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--dataset_dir", str(dataset), "--vl-model",
            str(backbone), "--model-preset", "tiny", "--sensor-window-size", "32", "--num_workers", "0",
            "--batch_size", "8", "--output_dir", str(out), "--set", "train.progress_bar=false", *extra]


@pytest.fixture(scope="session")
def stage1_run(tiny_backbone_dir, demo_dataset_dir, tmp_path_factory) -> Path:
    """A finished tiny Stage 1 run (one rank, in this process, 2 epochs at lr 1e-3): what the
    Stage 2 tests start from and tests/test_convert.py converts. Read it, never write into it."""
    from vla_ds.training.train import main

    out = tmp_path_factory.mktemp("stage1") / "run"
    assert main(stage1_flags(demo_dataset_dir, tiny_backbone_dir, out, "--epochs", "2", "--lr", "1e-3")) == 0
    return out


LAUNCHED_STAGE1_EPOCHS = 4


@pytest.fixture(scope="session")
def launched_stage1_run(tiny_backbone_dir, demo_dataset_dir, tmp_path_factory):
    """``deepspeed --num_gpus 2 scripts/train.py``: a tiny Stage 1 run on two ranks of one node
    (``LAUNCHED_STAGE1_EPOCHS`` epochs, lr 1e-3), made once for tests/test_train.py (the
    loss falls; resume) and tests/test_multinode.py (two one-rank nodes train the same).
    ``flags(out, epochs)`` are its scripts/train.py flags with another output directory (and
    epoch count). Tests that
    write into the run (a resume, a removed shard) work on a copy of ``out``."""
    import shutil
    import socket
    import subprocess
    import sys
    from types import SimpleNamespace

    def flags(out, epochs=LAUNCHED_STAGE1_EPOCHS):
        return stage1_flags(demo_dataset_dir, tiny_backbone_dir, out, "--lr", "1e-3", "--epochs", str(epochs))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("launched_stage1") / "run"
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cache = tmp_path_factory.mktemp("launched_stage1_cache")  # its own: the dataset index is built here, cold
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(port), str(REPO / "scripts" / "train.py"),
                           *flags(out)], env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                                                  VLA_DS_CACHE=str(cache)), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The two ranks indexed the dataset together: each a share, merged by rank 0 (no rank redid another's).
    assert "re-indexed on 2 ranks" in proc.stdout + proc.stderr and "no index part" not in proc.stdout + proc.stderr
    return SimpleNamespace(out=out, flags=flags, epochs=LAUNCHED_STAGE1_EPOCHS, launcher=launcher, cache=cache)
