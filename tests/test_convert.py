"""Checkpoint conversion: the pure state-dict functions on toy dicts, then every format
from a real 2-rank run (Stage 1, then Stage 2 LoRA) made through the DeepSpeed launcher."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import (
    capture_starting_weights,
    fp32_masters_from_shards,
    latest_tag_dir,
    model_states,
)

from vla_ds.errors import CheckpointError
from vla_ds.policy_tools import convert
from vla_ds.policy_tools.convert import main as convert_main

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "ds_configs"
LORA_KEY = "backbone.model.base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"


# ---------------------------------------------------------------------------------------
# Pure functions on toy dicts


def toy_state():
    return {
        "sensor_encoder.conv.0.weight": torch.ones(2, 3),
        "action_expert.head.bias": torch.zeros(7),
        "action_norm.mean": torch.zeros(7),
        "sensor_norm.std": torch.ones(4),
        LORA_KEY: torch.full((4, 8), 0.5),
        LORA_KEY.replace("lora_A", "lora_B"): torch.full((8, 4), 0.25),
        "backbone.model.model.language_model.layers.1.mlp.up_proj.weight": torch.ones(3, 3),
    }


def test_split_policy_state():
    parts = convert.split_policy_state(toy_state())
    assert sorted(parts["heads"]) == ["action_expert.head.bias", "action_norm.mean", "sensor_encoder.conv.0.weight",
                                      "sensor_norm.std"]
    assert sorted(parts["lora"]) == sorted([LORA_KEY, LORA_KEY.replace("lora_A", "lora_B")])
    assert list(parts["backbone"]) == ["backbone.model.model.language_model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="'stray.weight' belongs to no part"):
        convert.split_policy_state({"stray.weight": torch.zeros(1)})


def test_guide_dict_builders():
    stats = {"action_mean": [0.0] * 7}
    s1 = convert.stage1_checkpoint(toy_state(), stats)
    assert s1["training_stage"] == "stage1" and s1["norm_stats"] is stats
    assert list(s1["sensor_encoder"]) == ["conv.0.weight"] and list(s1["action_expert"]) == ["head.bias"]
    assert set(s1) == {"sensor_encoder", "action_expert", "training_stage", "norm_stats", "head"}
    assert s1["head"] == {"objective": "diffusion", "prediction_type": "epsilon"}  # unknown: the guide's head
    with pytest.raises(CheckpointError, match="no action_expert tensors"):
        convert.stage1_checkpoint({"sensor_encoder.w": torch.zeros(1)}, stats)
    s2 = convert.stage2_checkpoint(toy_state(), stats)
    assert s2["training_stage"] == "stage2" and s2["model_state_dict"].keys() == toy_state().keys()


def test_cast_floating_copies_and_keeps_integers():
    flat = torch.arange(12, dtype=torch.float32)
    state = {"a": flat[:6].view(2, 3), "b": flat[6:].view(3, 2).t(), "steps": torch.tensor([3], dtype=torch.int64)}
    out = convert.cast_floating(state, torch.bfloat16)
    assert out["a"].dtype == out["b"].dtype == torch.bfloat16 and out["steps"].dtype == torch.int64
    assert out["b"].is_contiguous() and torch.equal(out["b"].float(), state["b"])
    assert out["a"].untyped_storage().data_ptr() != out["b"].untyped_storage().data_ptr()
    same = convert.cast_floating(state, torch.float32)
    assert same["a"].data_ptr() != state["a"].data_ptr()  # a copy even when the dtype already matches


def test_pt_output_path(tmp_path):
    assert convert.pt_output_path(tmp_path / "x.pt", 7) == tmp_path / "x.pt"
    assert convert.pt_output_path(tmp_path / "dir", 7) == tmp_path / "dir" / "diffusion_step7.pt"


def test_policy_config_fills_the_built_sizes():
    from vla_ds.training.config import RunConfig

    run = RunConfig(stage="stage1").to_dict()
    run["vla_ds"]["data"]["sensor_window_size"] = 32
    state = {"action_expert.vl_proj.weight": torch.zeros(3072, 64)}
    cfg = convert.policy_config(run, {"sensor_mean": [0.0] * 5, "action_mean": [0.0] * 6}, state, fingerprint="f" * 16,
                                model_name_or_path="/base", source="/ckpt/global_step3", step=3)
    assert cfg["format"] == "vla_ds-policy" and cfg["format_version"] == 2 and cfg["stage"] == "stage1"
    assert cfg["action_expert"]["action_dim"] == 6  # the data's action dimension, not the config default
    assert cfg["sensor_encoder"]["in_channels"] == 5 and cfg["sensor_encoder"]["window_size"] == 32
    assert cfg["action_expert"]["vl_hidden_size"] == 64
    assert cfg["action_expert"]["sensor_feature_dim"] == cfg["sensor_encoder"]["out_dim"]
    assert cfg["backbone"]["fingerprint"] == "f" * 16 and cfg["backbone"]["model_name_or_path"] == "/base"
    assert cfg["finetune"]["mode"] == "none" and cfg["step"] == 3 and cfg["weights"] == "trained"
    assert cfg["action_expert"]["objective"] == "diffusion" and cfg["action_expert"]["prediction_type"] == "sample"
    json.dumps(cfg)
    # A run config written before the head was configurable: the guide's epsilon head.
    del run["vla_ds"]["action_expert"]["objective"], run["vla_ds"]["action_expert"]["prediction_type"]
    old = convert.policy_config(run, {"sensor_mean": [0.0] * 5, "action_mean": [0.0] * 7}, state, fingerprint="f" * 16,
                                model_name_or_path="/base", source="/ckpt/global_step3", step=3)
    assert (old["action_expert"]["objective"], old["action_expert"]["prediction_type"]) == ("diffusion", "epsilon")


# ---------------------------------------------------------------------------------------
# A real 2-rank run


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(config, dataset, backbone, out, *extra):
    return ["--ds_config", str(CONFIGS / config), "--dataset_dir", str(dataset), "--vl-model", str(backbone),
            "--model-preset", "tiny", "--sensor-window-size", "32", "--num_workers", "0", "--batch_size", "8",
            "--output_dir", str(out), "--set", "train.progress_bar=false", *extra]


@pytest.fixture(scope="module")
def runs(stage1_run, tiny_backbone_dir, demo_dataset_dir, tmp_path_factory):
    """Stage 1 (conftest's stage1_run: 2 epochs, in-process on one rank, as a launch costs
    ~15 s of start-up here), then Stage 2 LoRA r=4 from it on 2 ranks through the DeepSpeed
    launcher (1 epoch = 2 steps). The VL lr is high so the adapters move far enough to tell
    the base from base+adapter."""
    root = tmp_path_factory.mktemp("convert")
    common = ["--set", f"cache.dir={root / 'cache'}"]
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "scripts" / "train.py"),
           *run_args("stage2.json", demo_dataset_dir, tiny_backbone_dir, root / "s2", *common, "--stage1-checkpoint",
                     str(stage1_run), "--lora-r", "4", "--epochs", "1", "--vl-lr", "1e-2", "--lr", "1e-3")]
    proc = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"s1": stage1_run, "s2": root / "s2", "root": root}


def convert_cli(*argv):
    return convert_main([str(a) for a in argv])


def safetensors_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_consolidated_weights_equal_the_trained_ones(runs, tmp_path):
    assert convert_cli(runs["s2"], tmp_path / "fp32", "--to", "fp32") == 0
    assert convert_cli(runs["s2"], tmp_path / "bf16", "--to", "bf16") == 0
    fp32 = safetensors_state(tmp_path / "fp32" / "model.safetensors")
    bf16 = safetensors_state(tmp_path / "bf16" / "model.safetensors")
    module = model_states(runs["s2"])["module"]  # what the engine trained with (bf16) + fp32 buffers
    assert fp32.keys() == module.keys() == bf16.keys()
    assert any(".lora_B." in k for k in fp32) and not any(k.startswith("backbone.") and ".lora_" not in k for k in fp32)
    masters = fp32_masters_from_shards(runs["s2"])["fp32"]
    assert masters.keys() == {k for k in module if not k.endswith(("_norm.mean", "_norm.std"))}
    for name, value in fp32.items():
        assert value.dtype == torch.float32 and bf16[name].dtype == torch.bfloat16
        if name in masters:
            assert torch.equal(value, masters[name]), name  # the fp32 master, exactly
        else:
            assert torch.equal(value, module[name]), name  # buffers
        assert torch.allclose(value, module[name].float(), rtol=2 ** -7, atol=1e-6), name
        assert torch.equal(bf16[name], value.to(torch.bfloat16)), name
    lora_b = [v for k, v in fp32.items() if ".lora_B." in k]
    assert max(float(v.abs().max()) for v in lora_b) > 1e-3  # the adapters trained


def build_policy(cfg_dict, backbone_dir, norm_stats):
    from vla_ds.data import NormStats
    from vla_ds.models.backbone import VLBackbone
    from vla_ds.models.policy import VLAPolicy
    from vla_ds.training.config import RunConfig

    cfg = RunConfig.from_dict(cfg_dict)
    backbone = VLBackbone(cfg.backbone.__class__(**{**cfg.backbone.__dict__, "model_name_or_path": str(backbone_dir)}))
    policy = VLAPolicy(backbone, cfg.sensor_encoder, cfg.action_expert, NormStats.from_dict(norm_stats),
                       sensor_channels=len(norm_stats["sensor_mean"]), sensor_window_size=cfg.data.sensor_window_size)
    policy.backbone.setup_finetune(cfg.finetune)
    return policy


def test_include_base_gives_the_whole_policy_and_stage2_pt(runs, tiny_backbone_dir, tmp_path):
    assert convert_cli(runs["s2"], tmp_path / "full", "--to", "fp32", "--include-base") == 0
    assert convert_cli(runs["s2"], tmp_path / "s2.pt", "--to", "stage2") == 0
    full = safetensors_state(tmp_path / "full" / "model.safetensors")
    states = model_states(runs["s2"])
    policy = build_policy(states["config"], tiny_backbone_dir, states["norm_stats"])
    own = policy.state_dict()
    assert full.keys() == own.keys()  # every VLAPolicy tensor, under its own name
    for k, v in full.items():
        want = states["module"][k] if k in states["module"] else own[k]  # trained, or the base
        assert v.dtype == torch.float32 and torch.allclose(v, want.float(), rtol=2 ** -7, atol=1e-6), k
    guide = torch.load(tmp_path / "s2.pt", map_location="cpu", weights_only=True)
    assert guide["training_stage"] == "stage2" and guide["norm_stats"] == states["norm_stats"]
    assert guide["model_state_dict"].keys() == states["module"].keys()
    for k, v in guide["model_state_dict"].items():
        assert torch.equal(v, full[k]), k


def test_stage1_pt_starts_stage2(runs, tiny_backbone_dir, demo_dataset_dir, tmp_path, monkeypatch):
    from vla_ds.training.train import main

    assert convert_cli(runs["s1"], tmp_path, "--to", "stage1") == 0
    step = model_states(runs["s1"])["step"]
    pt = tmp_path / f"diffusion_step{step}.pt"
    guide = torch.load(pt, map_location="cpu", weights_only=True)
    assert guide["training_stage"] == "stage1" and set(guide) == {"sensor_encoder", "action_expert",
                                                                  "training_stage", "norm_stats", "head"}
    assert guide["head"] == {"objective": "diffusion", "prediction_type": "sample",  # Stage 2 continues that head
                             "vl_conditioning": "tokens", "vl_grid": 4, "vl_attention": "joint",
                             "vl_normalize": False}
    out = tmp_path / "s2"
    start = capture_starting_weights(monkeypatch)
    assert main(run_args("stage2.json", demo_dataset_dir, tiny_backbone_dir, out, "--stage1-checkpoint", str(pt),
                         "--max_steps", "1", "--grad_accum", "1", "--lora-r", "4")) == 0
    loaded = model_states(out)["module"]
    for part in ("sensor_encoder", "action_expert"):  # Stage 2's masters start as Stage 1's fp32 heads
        for k, v in guide[part].items():
            assert v.dtype == torch.float32 and torch.equal(start["fp32"][f"{part}.{k}"], v), k
    for k in ("action_norm.mean", "sensor_norm.std"):  # the norm stats came along
        assert torch.equal(loaded[k], model_states(runs["s1"])["module"][k])


def vl_features(backbone_cfg, backbone_model, samples):
    """Pooled features of ``samples`` through vla_ds's VLInputBuilder + VLBackbone forward."""
    from vla_ds.batch import VL_INPUT_KEYS
    from vla_ds.models.backbone import VLInputBuilder

    builder = VLInputBuilder.from_pretrained(backbone_cfg)
    batch = builder([s["images"] for s in samples], [s["instruction"] for s in samples])
    with torch.no_grad():
        return backbone_model.eval()(*(batch[k] for k in VL_INPUT_KEYS)), batch


def test_policy_dir_adapter_and_merged_backbone(runs, tiny_backbone_dir, demo_dataset_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vla_ds.data import DataConfig, VLADataset
    from vla_ds.models.backbone import VLBackbone
    from vla_ds.training.config import RunConfig

    out = tmp_path / "policy"
    assert convert_cli(runs["s2"], out, "--to", "policy", "--merge-lora") == 0
    states = model_states(runs["s2"])
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.json", "merged_backbone", "model.safetensors",
                                                      "norm_stats.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "vla_ds-policy" and cfg["stage"] == "stage2" and cfg["finetune"]["mode"] == "lora"
    assert cfg["backbone"]["fingerprint"] == states["backbone_fingerprint"] and cfg["step"] == states["step"]
    assert cfg["source_checkpoint"] == str(latest_tag_dir(runs["s2"]))
    assert cfg["sensor_encoder"]["in_channels"] == 16 and cfg["action_expert"]["vl_hidden_size"] == 64
    assert json.loads((out / "norm_stats.json").read_text()) == states["norm_stats"]
    weights = safetensors_state(out / "model.safetensors")
    assert weights.keys() == {k for k in states["module"] if not k.startswith("backbone.")}
    assert all(v.dtype == torch.float32 for v in weights.values())
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        # peft's adapter-file names: no "backbone.model." prefix, no adapter name
        want = {k[len("backbone.model."):].replace(".default", "") for k in states["module"] if ".lora_" in k}
        assert set(f.keys()) == want and want

    run_cfg = RunConfig.from_dict(states["config"])
    base_cfg = run_cfg.backbone.__class__(**{**run_cfg.backbone.__dict__, "model_name_or_path": str(tiny_backbone_dir)})
    dataset = VLADataset.from_config(DataConfig(dataset_dir=str(demo_dataset_dir), sensor_window_size=32))
    samples = [dataset[i] for i in (0, 60, 200)]

    # The trained backbone rebuilt from the checkpoint (the adapters as the engine held them).
    trained = VLBackbone(base_cfg)
    trained.setup_finetune(run_cfg.finetune)
    own = trained.state_dict()
    for k, v in states["module"].items():
        if ".lora_" in k:
            own[k[len("backbone."):]].copy_(v)
    want, batch = vl_features(base_cfg, trained, samples)

    # Plain peft: base + adapter folder.
    with_adapter = VLBackbone(base_cfg)
    with_adapter.model = PeftModel.from_pretrained(with_adapter.model, str(out / "adapter"))
    got, _ = vl_features(base_cfg, with_adapter, samples)
    base_only, _ = vl_features(base_cfg, VLBackbone(base_cfg), samples)
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), (got - want).abs().max()
    assert (base_only - want).abs().max() > 5 * (got - want).abs().max()  # the adapter matters

    # The merged backbone: plain transformers loads it, and vla_ds's input builder reads its tokenizer.
    merged_dir = out / "merged_backbone"
    Qwen2_5_VLForConditionalGeneration.from_pretrained(str(merged_dir))
    merged_cfg = base_cfg.__class__(**{**base_cfg.__dict__, "model_name_or_path": str(merged_dir)})
    merged, merged_batch = vl_features(merged_cfg, VLBackbone(merged_cfg), samples)
    assert all(torch.equal(merged_batch[k], batch[k]) for k in batch)
    assert torch.allclose(merged, got, atol=2e-2, rtol=2e-2), (merged - got).abs().max()


def test_stage1_policy_has_no_adapter(runs, tmp_path):
    assert convert_cli(runs["s1"], tmp_path / "p", "--to", "policy") == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "model.safetensors", "norm_stats.json"]
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["stage"] == "stage1" and cfg["finetune"]["mode"] == "none"


def test_universal_checkpoint_resumes_on_one_rank(runs, tiny_backbone_dir, demo_dataset_dir, tmp_path, monkeypatch):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from vla_ds.training import checkpoint
    from vla_ds.training.metrics import read_metrics
    from vla_ds.training.train import main

    universal = tmp_path / "universal"
    assert convert_cli(runs["s2"], universal, "--to", "universal") == 0
    original = model_states(runs["s2"])
    saved = torch.load(latest_tag_dir(universal) / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=True)
    for key in ("step", "epoch", "micro_step_in_epoch", "norm_stats", "config", "backbone_fingerprint", "world_size"):
        assert saved[key] == original[key], key
    assert checkpoint.is_universal(latest_tag_dir(universal)) and original["world_size"] == 2

    # Spy on the load: the weights and Adam moments the one-rank engine holds right after it.
    loaded = {}
    real_load = checkpoint.load_checkpoint

    def spy(engine, path):
        client = real_load(engine, path)
        assert engine._config.load_universal_checkpoint
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                loaded[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
        loaded["scheduler_iteration"] = engine.lr_scheduler.last_batch_iteration
        return client

    monkeypatch.setattr(checkpoint, "load_checkpoint", spy)
    out = tmp_path / "resumed"
    # One rank, the same global batch (8 x 16 x 1 = 8 x 8 x 2): the same steps per epoch. One
    # step of the 2-epoch run's schedule (given as numbers: --max_steps alone would size it).
    first_total = json.loads((runs["s2"] / "config.json").read_text())["scheduler"]["params"]["total_num_steps"]
    assert main(run_args("stage2.json", demo_dataset_dir, tiny_backbone_dir, out, "--lora-r", "4", "--vl-lr", "1e-2",
                         "--lr", "1e-3", "--grad_accum", "16", "--epochs", "2", "--max_steps", str(original["step"] + 1),
                         "--set", f"scheduler.params.total_num_steps={2 * first_total}",
                         "--set", f"scheduler.params.warmup_num_steps={max(1, round(0.05 * 2 * first_total))}",
                         "--resume", str(universal))) == 0

    shards = fp32_masters_from_shards(runs["s2"])
    assert set(loaded) - {"scheduler_iteration"} == set(shards["fp32"])
    for name in shards["fp32"]:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[name][key], shards[key][name]), (name, key)
    assert loaded["scheduler_iteration"] == original["lr_scheduler"]["last_batch_iteration"]

    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == [original["step"] + 1]
    assert math.isfinite(rows[0]["train/loss"]) and rows[0]["epoch"] == original["epoch"] + 1
    # The lr of the first resumed update: the uninterrupted 2-epoch schedule's next value
    # (update k runs at scheduler iteration k).
    resolved = json.loads((out / "config.json").read_text())
    first_run = json.loads((runs["s2"] / "config.json").read_text())
    params = resolved["scheduler"]["params"]
    assert params["total_num_steps"] == 2 * first_run["scheduler"]["params"]["total_num_steps"]
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosineLR(dummy, params["total_num_steps"], params["warmup_min_ratio"], params["warmup_num_steps"],
                              params["cos_min_ratio"], params["warmup_type"], last_batch_iteration=original["step"] + 1)
    ratio = schedule.get_lr_ratio()
    assert 0 < ratio < 1
    assert rows[0]["train/lr/other"] == pytest.approx(1e-3 * ratio, rel=1e-6)
    assert rows[0]["train/lr/vl"] == pytest.approx(1e-2 * ratio, rel=1e-6)
    assert (out / "latest").read_text().strip() == f"global_step{original['step'] + 1}"


def test_plain_checkpoint_on_another_rank_count_points_to_universal(runs, tiny_backbone_dir, demo_dataset_dir,
                                                                     tmp_path, capsys):
    from vla_ds.training.train import main

    code = main(run_args("stage2.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "o", "--lora-r", "4",
                         "--grad_accum", "16", "--epochs", "2", "--resume", str(runs["s2"])))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--to universal" in err and "saved by 2 ranks" in err


@pytest.mark.parametrize("case", ["missing", "no_latest", "unknown_tag", "stage1_merge_lora", "stage2_from_stage1",
                                  "unknown_format", "include_base_policy", "universal_not_empty", "universal_source"])
def test_bad_arguments_are_one_line_and_exit_2(case, runs, tmp_path, capsys):
    out = tmp_path / "out"
    tags = ", ".join(sorted((p.name for p in runs["s1"].glob("global_step*")),  # one per epoch, by step
                            key=lambda name: int(name.removeprefix("global_step"))))
    assert latest_tag_dir(runs["s1"]).name in tags
    if case == "missing":
        argv, expect = [tmp_path / "nope", out, "--to", "fp32"], [str(tmp_path / "nope"), "does not exist"]
    elif case == "no_latest":
        src = tmp_path / "run"
        shutil.copytree(runs["s1"], src, ignore=shutil.ignore_patterns("*optim_states.pt"))
        (src / "latest").unlink()
        argv, expect = [src, out, "--to", "fp32"], [str(src), "no 'latest' file", f"available: {tags})"]
    elif case == "unknown_tag":
        argv, expect = [runs["s1"], out, "--to", "fp32", "--tag", "global_step999"], [
            str(runs["s1"]), "no checkpoint tag 'global_step999'", f"available: {tags})"]
    elif case == "stage1_merge_lora":
        argv, expect = [runs["s1"], out, "--to", "policy", "--merge-lora"], [
            str(latest_tag_dir(runs["s1"])), "--merge-lora needs a LoRA checkpoint", "stage1"]
    elif case == "stage2_from_stage1":
        argv, expect = [runs["s1"], out, "--to", "stage2"], [str(latest_tag_dir(runs["s1"])), "needs a Stage 2"]
    elif case == "unknown_format":
        argv, expect = [runs["s1"], out, "--to", "onnx"], ["--to onnx: unknown format", "universal"]
    elif case == "include_base_policy":
        argv, expect = [runs["s1"], out, "--to", "policy", "--include-base"], ["--include-base", "not policy"]
    elif case == "universal_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
        argv, expect = [runs["s1"], out, "--to", "universal"], [str(out), "not empty"]
    else:
        assert convert_cli(runs["s1"], tmp_path / "u", "--to", "universal") == 0
        capsys.readouterr()
        argv, expect = [tmp_path / "u", out, "--to", "fp32"], ["already a universal checkpoint"]
    code = convert_cli(*argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err
    for piece in expect:
        assert piece in lines[0], (piece, lines[0])
    assert not captured.out
