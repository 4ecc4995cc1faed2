"""The users' guide (shared/reference/stage2_lora_training_guide.md), its command lines as
written: torchrun, no --ds_config (the stage picks ds_configs/<stage>.json), and the guide's
weights-only ``--resume diffusion_epochN.pt``."""

import json
import os
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import capture_starting_weights

from vla_ds.training import config as config_lib
from vla_ds.training.metrics import read_metrics
from vla_ds.training.train import main

REPO = Path(__file__).resolve().parent.parent

# The guide's command lines, verbatim but for paths: the script (training/A5st_...py ->
# scripts/train.py), the dataset and the Stage 1 checkpoint (the guide's .pt -> the Stage 1
# output dir, which --stage1-checkpoint also takes). torchrun runs 2 ranks here, not 4.
GUIDE_STAGE1 = """--dataset_dir DATA --training-stage stage1 --epochs 20 --batch_size 4 --lr 1e-4"""
GUIDE_STAGE2 = """--dataset_dir DATA --training-stage stage2 --stage1-checkpoint checkpoints/stage1
    --finetune-vl lora --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --epochs 10 --batch_size 4 --lr 1e-4
    --vl-lr 1e-5 --grad_accum 8"""
GUIDE_EXAMPLE_STAGE2 = """--dataset_dir DATA --training-stage stage2 --stage1-checkpoint checkpoints/stage1
    --finetune-vl lora --epochs 10 --batch_size 4 --lr 1e-4 --vl-lr 1e-5"""
GUIDE_LOG_LINES = ["Stage 2: Training Full Model with LoRA", "Loading Stage 1 checkpoint from checkpoints/stage1",
                   "Loaded Sensor Encoder from Stage 1", "Loaded Diffusion Action Expert from Stage 1",
                   "Applying LoRA fine-tuning to VL model", "LoRA trainable parameters:", "Optimizer config:",
                   "VL params:", "Other params:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_stage_configs(workdir: Path, backbone: Path, max_steps: int = 3) -> None:
    """``workdir/ds_configs/stage{1,2}.json``: the shipped JSONs made tiny (the tiny backbone and
    preset, a 32-sample window, no workers, a few steps): what a user's edited copy looks like."""
    (workdir / "ds_configs").mkdir(parents=True)
    for stage in config_lib.STAGES:
        raw = json.loads((REPO / "ds_configs" / f"{stage}.json").read_text())
        for key, value in {"vla_ds.model_preset": "tiny", "vla_ds.backbone.model_name_or_path": str(backbone),
                           "vla_ds.data.sensor_window_size": 32, "vla_ds.data.num_workers": 0,
                           "vla_ds.train.max_steps": max_steps, "vla_ds.train.progress_bar": False}.items():
            config_lib.apply_override(raw, key, value)
        (workdir / "ds_configs" / f"{stage}.json").write_text(json.dumps(raw, indent=2))


def guide_command(line: str, dataset: Path) -> list[str]:
    return shlex.split(line.replace("DATA", str(dataset)))


def torchrun(workdir: Path, argv: list[str]) -> subprocess.CompletedProcess:
    launcher = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [launcher, "--nproc_per_node=2", f"--master_port={free_port()}", str(REPO / "scripts" / "train.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_guide_command_lines_run_under_torchrun(tiny_backbone_dir, demo_dataset_dir, tmp_path, monkeypatch, capsys):
    tiny_stage_configs(tmp_path, tiny_backbone_dir)
    # Stage 1 (in this process, as `python scripts/train.py` would run it: the launches below
    # are the torchrun ones): ds_configs/stage1.json of the working directory, the guide's
    # flags over it.
    monkeypatch.chdir(tmp_path)
    assert main(guide_command(GUIDE_STAGE1, demo_dataset_dir)) == 0
    assert f"no --ds_config: using {tmp_path / 'ds_configs' / 'stage1.json'}" in capsys.readouterr().err
    saved = json.loads((tmp_path / "checkpoints" / "stage1" / "config.json").read_text())
    assert saved["train_micro_batch_size_per_gpu"] == 4 and saved["train_batch_size"] == 4
    s1 = tmp_path / "checkpoints" / "stage1"
    assert saved["vla_ds"]["train"]["epochs"] == 20 and saved["vla_ds"]["optimizer_groups"]["other"]["lr"] == 1e-4
    rows = [r for r in read_metrics(s1) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["train/lr/other"] > 0 for r in rows)

    # Stage 2, the guide's command line with its LoRA flags.
    proc = torchrun(tmp_path, guide_command(GUIDE_STAGE2, demo_dataset_dir))
    for piece in GUIDE_LOG_LINES:
        assert piece in proc.stderr, piece
    s2 = tmp_path / "checkpoints" / "stage2"
    saved = json.loads((s2 / "config.json").read_text())
    lora = saved["vla_ds"]["finetune"]
    assert saved["vla_ds"]["stage"] == "stage2" and lora["mode"] == "lora"
    assert (lora["lora_r"], lora["lora_alpha"], lora["lora_dropout"]) == (16, 32, 0.05)
    assert {k: saved["vla_ds"]["optimizer_groups"][k]["lr"] for k in ("vl", "other")} == {"vl": 1e-5, "other": 1e-4}
    assert saved["gradient_accumulation_steps"] == 8 and saved["train_batch_size"] == 64

    # The guide's "continue training": its .pt (convert_checkpoint.py makes one), --resume,
    # appended to the guide's "Example Training Run" Stage 2 command.
    # The script runs in this process (its cwd is still tmp_path), as `python` would run it.
    script = str(REPO / "scripts" / "convert_checkpoint.py")
    monkeypatch.setattr(sys, "argv", [script, "checkpoints/stage2", "checkpoints", "--to", "stage2"])
    with pytest.raises(SystemExit) as converted:
        runpy.run_path(script, run_name="__main__")
    assert converted.value.code == 0, capsys.readouterr().err[-2000:]
    pt = tmp_path / "checkpoints" / "diffusion_step3.pt"
    assert pt.is_file()
    proc = torchrun(tmp_path, [*guide_command(GUIDE_EXAMPLE_STAGE2, demo_dataset_dir),
                               "--resume", "checkpoints/diffusion_step3.pt"])
    assert "Stage 2: Training Full Model with LoRA" in proc.stderr
    said = [line for line in proc.stderr.splitlines() if "weights-only checkpoint" in line]
    assert len(said) == 1 and "fresh optimizer" in said[0] and "checkpoints/stage2_resumed" in said[0], said
    resumed = tmp_path / "checkpoints" / "stage2_resumed"
    # It started from the .pt's weights: its step-0 validation is Stage 2's last one; and
    # the earlier run's checkpoints and metrics are untouched.
    first_val = [r["val/loss"] for r in read_metrics(resumed) if "val/loss" in r]
    last_val = [r["val/loss"] for r in read_metrics(s2) if "val/loss" in r]
    assert read_metrics(resumed)[0]["step"] == 0 and first_val[0] == pytest.approx(last_val[-1], rel=1e-4)
    assert [r["step"] for r in read_metrics(resumed) if "train/loss" in r] == [1, 2, 3]
    assert (s2 / "latest").read_text().strip() == "global_step3" and max(r["step"] for r in read_metrics(s2)) == 3


def test_without_ds_config_the_stage_picks_the_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_lib.stage_config_path("stage2") == REPO / "ds_configs" / "stage2.json"
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "stage2.json").write_text("{}")
    assert config_lib.stage_config_path("stage2") == tmp_path / "ds_configs" / "stage2.json"
    assert config_lib.stage_config_path("stage1") == REPO / "ds_configs" / "stage1.json"


def tiny_args(dataset, backbone, out, *extra):
    return ["--dataset_dir", str(dataset), "--vl-model", str(backbone), "--model-preset", "tiny",
            "--sensor-window-size", "32", "--num_workers", "0", "--batch_size", "8", "--output_dir", str(out),
            "--set", "train.progress_bar=false", *extra]


@pytest.fixture(scope="module")
def stage1_pt(tiny_backbone_dir, demo_dataset_dir, tmp_path_factory):
    """A 2-step Stage 1 run and its guide-format .pt."""
    from vla_ds.policy_tools import convert

    root = tmp_path_factory.mktemp("guide_pt")
    assert main(tiny_args(demo_dataset_dir, tiny_backbone_dir, root / "s1", "--max_steps", "2", "--lr", "1e-3")) == 0
    return convert.convert(root / "s1", root / "pt", to="stage1").written[0]


def test_weights_only_resume_starts_from_the_file_with_a_fresh_optimizer(stage1_pt, tiny_backbone_dir,
                                                                         demo_dataset_dir, tmp_path, monkeypatch,
                                                                         capsys):
    guide = torch.load(stage1_pt, map_location="cpu", weights_only=True)
    out = tmp_path / "run"
    (out / "global_step5").mkdir(parents=True)
    (out / "latest").write_text("global_step5")  # an earlier run's: kept
    start = capture_starting_weights(monkeypatch)
    assert main(tiny_args(demo_dataset_dir, tiny_backbone_dir, out, "--max_steps", "2", "--lr", "1e-3",
                          "--resume", str(stage1_pt))) == 0
    for part in ("sensor_encoder", "action_expert"):
        for k, v in guide[part].items():
            assert torch.equal(start["fp32"][f"{part}.{k}"], v), k
    err = capsys.readouterr().err
    assert f"--resume {stage1_pt}: a weights-only checkpoint" in err and "fresh optimizer" in err
    resumed = tmp_path / "run_resumed"
    assert [r["step"] for r in read_metrics(resumed) if "train/loss" in r] == [1, 2]
    assert (out / "latest").read_text() == "global_step5" and not (out / "metrics.jsonl").exists()
    saved = json.loads((resumed / "config.json").read_text())["vla_ds"]
    assert saved["train"]["resume"] == "" and saved["train"]["output_dir"] == str(resumed)


@pytest.mark.parametrize("case", ["not_weights", "stage2_in_stage1", "missing_stage1_pt"])
def test_bad_weights_file_is_one_message(case, stage1_pt, tiny_backbone_dir, demo_dataset_dir, tmp_path, capsys):
    if case == "not_weights":
        bad = tmp_path / "diffusion_epoch3.pt"
        torch.save({"epoch": 3, "optimizer": {}}, bad)
        extra, expect = ["--resume", str(bad)], [str(bad), "not a Stage 1 or Stage 2 weights file", "epoch, optimizer"]
    elif case == "stage2_in_stage1":
        guide = torch.load(stage1_pt, map_location="cpu", weights_only=True)
        state = {f"{p}.{k}": v for p in ("sensor_encoder", "action_expert") for k, v in guide[p].items()}
        state["backbone.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(4, 64)
        bad = tmp_path / "s2.pt"
        torch.save({"model_state_dict": state, "training_stage": "stage2"}, bad)
        extra, expect = ["--resume", str(bad)], [str(bad), "saved by a stage2 run", "--training-stage"]
    else:
        missing = tmp_path / "checkpoints" / "diffusion_epoch20.pt"
        extra = ["--training-stage", "stage2", "--stage1-checkpoint", str(missing)]
        expect = [str(missing), "does not exist", "checkpoints/stage1", "convert_checkpoint.py --to stage1"]
    code = main(tiny_args(demo_dataset_dir, tiny_backbone_dir, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for piece in expect:
        assert piece in err, (piece, err)
