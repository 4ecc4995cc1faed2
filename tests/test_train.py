"""The real entry point, in-process (one rank) and through the DeepSpeed launcher (two ranks)."""

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from vla_ds.errors import CheckpointError
from vla_ds.training.checkpoint import strict_trainable_load
from vla_ds.training.metrics import read_metrics
from vla_ds.training.train import main

REPO = Path(__file__).resolve().parent.parent
STAGE1 = str(REPO / "ds_configs" / "stage1.json")


def tiny_args(dataset, backbone, out, *extra):
    return ["--ds_config", STAGE1, "--dataset_dir", str(dataset), "--vl-model", str(backbone),
            "--model-preset", "tiny", "--sensor-window-size", "32", "--num_workers", "0",
            "--output_dir", str(out), "--set", "train.progress_bar=false", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_in_process_run_writes_metrics_config_and_checkpoints(tiny_backbone_dir, demo_dataset_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(demo_dataset_dir, tiny_backbone_dir, out, "--batch_size", "8", "--grad_accum", "2",
                          "--epochs", "2", "--lr", "1e-3", "--set", "csv_monitor.enabled=true")) == 0
    # What the image budget makes of the cameras, once at start (the demo's 64x48 views).
    assert re.search(r"LM tokens per sample: \d+ \(64x48 -> \d+x\d+: \d+ tokens, 64x48 -> ", capsys.readouterr().err)
    rows = read_metrics(out)
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    steps_per_epoch = len(train) // 2
    assert [r["step"] for r in train] == list(range(1, 2 * steps_per_epoch + 1))
    assert [r["epoch"] for r in val] == [1, 2]
    assert {"train/lr/other", "samples_per_s", "data_share", "train/grad_norm"} <= set(train[0])
    assert (out / "latest").read_text().strip() == f"global_step{2 * steps_per_epoch}"
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_batch_size"] == 16 and saved["vla_ds"]["train"]["epochs"] == 2
    params = saved["scheduler"]["params"]
    assert params["total_num_steps"] == 2 * steps_per_epoch and params["warmup_min_ratio"] == 0
    # Update k runs at warmup step k: the first update already learns, the warmup's last
    # reaches the peak, the schedule's last update its end.
    lrs = [r["train/lr/other"] for r in train]
    warmup = params["warmup_num_steps"]
    assert warmup > 1 and lrs[0] == pytest.approx(1e-3 / warmup)
    assert lrs[:warmup] == sorted(lrs[:warmup]) and max(lrs) == pytest.approx(1e-3, rel=0.02)
    assert lrs[-1] == pytest.approx(1e-3 * params["cos_min_ratio"])
    # DeepSpeed's CSV monitor got the same figures.
    csv_files = {p.name: p for p in (out / "monitor").rglob("*.csv")}
    loss_csv = next(p for name, p in csv_files.items() if "train" in name and "loss" in name)
    assert len(loss_csv.read_text().strip().splitlines()) - 1 == len(train)
    assert any("val" in name for name in csv_files)


def test_wandb_logs_through_deepspeeds_monitor(tiny_backbone_dir, demo_dataset_dir, tmp_path, monkeypatch):
    """wandb is installed with vla_ds: a run with the JSON's wandb section on (offline here)
    logs the metrics.jsonl figures to a wandb run, and ends it."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(tiny_args(demo_dataset_dir, tiny_backbone_dir, out, "--batch_size", "8", "--max_steps", "3",
                          "--set", "wandb.enabled=true", "--set", "wandb.project=vla_ds_test")) == 0
    assert wandb.run is None  # finished
    wandb.teardown()  # the wandb service writes the run file on its own time; stop it so the file is complete
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    raw = logs[0].read_bytes()
    assert b"train/loss" in raw and b"train/lr/other" in raw and b"val/loss" in raw
    # Stopped mid-epoch by max_steps: the validation row names the epoch its training rows do.
    rows = read_metrics(out)
    last_train = [r for r in rows if "train/loss" in r][-1]
    (val,) = [r for r in rows if "val/loss" in r]
    assert (val["step"], val["epoch"]) == (3, last_train["epoch"]) == (3, 1)


@pytest.mark.parametrize("case", ["no_dataset", "not_qwen", "bad_batch", "unknown_key", "corrupt_image_in_worker"])
def test_bad_input_is_one_message_and_exit_2(case, tiny_backbone_dir, demo_dataset_dir, tmp_path, capsys):
    dataset, backbone, extra = demo_dataset_dir, tiny_backbone_dir, []
    if case == "no_dataset":
        dataset = tmp_path / "missing_dataset"
        expect = str(dataset)
    elif case == "not_qwen":
        backbone = tmp_path / "not_qwen"
        backbone.mkdir()
        (backbone / "config.json").write_text(json.dumps({"model_type": "bert"}))
        expect = str(backbone)
    elif case == "bad_batch":
        extra = ["--set", "train_batch_size=7"]
        expect = "inconsistent batch settings"
    elif case == "unknown_key":
        extra = ["--set", "data.sensor_windw_size=3"]
        expect = "did you mean 'sensor_window_size'"
    else:  # decoded in a DataLoader worker process: the message still names the file, once
        dataset = tmp_path / "dataset"
        shutil.copytree(demo_dataset_dir, dataset)
        for image in dataset.rglob("images/*/*.*"):
            image.write_bytes(image.read_bytes()[:40])  # truncated
        extra = ["--num_workers", "2", "--max_steps", "1"]
        expect = str(dataset)
    code = main(tiny_args(dataset, backbone, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert expect in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    if case == "corrupt_image_in_worker":
        line = next(line for line in err.splitlines() if line.startswith("error:"))
        assert "/images/" in line and "Original" not in line


def test_deepspeed_launcher_two_ranks_loss_falls_and_resumes(launched_stage1_run, tmp_path):
    """The 4-epoch run is conftest's launched_stage1_run (`deepspeed --num_gpus 2`, shared with
    tests/test_multinode.py); its resume, a second launch, writes into a copy of it."""
    run = launched_stage1_run
    assert run.epochs == 4
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VLA_DS_CACHE=str(run.cache))
    out = tmp_path / "ds_run"
    shutil.copytree(run.out, out)

    def launch(epochs, *extra):
        cmd = [run.launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "scripts" / "train.py"),
               *run.flags(out, epochs), *extra]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    rows = read_metrics(out)
    train = [r for r in rows if "train/loss" in r]
    steps_per_epoch = len(train) // 4
    k = max(3, steps_per_epoch // 2)
    first = sum(r["train/loss"] for r in train[:k]) / k
    last = sum(r["train/loss"] for r in train[-k:]) / k
    assert last < 0.6 * first, (first, last)
    assert all(r["train/lr/other"] > 0 for r in train)
    assert [r["epoch"] for r in rows if "val/loss" in r] == [1, 2, 3, 4]
    tags = sorted(p.name for p in out.glob("global_step*"))
    assert len(tags) == 4 and (out / "latest").read_text().strip() == f"global_step{4 * steps_per_epoch}"
    # The frozen backbone is not in the checkpoint; the heads are, and load strictly.
    ckpt_file = out / f"global_step{4 * steps_per_epoch}" / "mp_rank_00_model_states.pt"
    module = torch.load(ckpt_file, map_location="cpu", weights_only=False)["module"]
    assert not any(k.startswith("backbone.") and "weight" in k for k in module)
    assert any(k.startswith("sensor_encoder.") for k in module) and any(k.startswith("action_expert.") for k in module)

    # Resume: the run continues at the next step with the saved state (no restart), on the
    # dataset index the first launch built (its ranks split the work; nothing is indexed again).
    log = launch(5, "--resume", str(out))
    assert "indexed" not in log.stdout + log.stderr and "dataset index" not in log.stdout + log.stderr
    rows = read_metrics(out)
    resumed = [r for r in rows if "train/loss" in r][len(train):]
    assert [r["step"] for r in resumed] == list(range(4 * steps_per_epoch + 1, 5 * steps_per_epoch + 1))
    assert sum(r["train/loss"] for r in resumed) / len(resumed) < first


def test_strict_load_names_mismatched_tensors():
    dst = torch.nn.Sequential(torch.nn.Linear(3, 2))
    src = {"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"0\.weight is \(2, 4\) in the file but \(2, 3\) in the model"):
        strict_trainable_load(src, dst)
    with pytest.raises(CheckpointError, match=r"1 tensors missing \(0\.bias\)"):
        strict_trainable_load({"0.weight": torch.zeros(2, 3)}, dst)
