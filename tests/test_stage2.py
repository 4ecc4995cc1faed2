"""Stage 2 through the real entry point (one rank, in-process): Stage 1 weights in,
continuity, two learning rates, lean checkpoints, exact resume, the offload configs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import (
    capture_starting_weights,
    fp32_masters_from_shards,
    same_schedule,
)

from vla_ds.training.checkpoint import read_model_states
from vla_ds.training.metrics import read_metrics
from vla_ds.training.train import main

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "ds_configs"


def args(config, dataset, backbone, out, *extra):
    return ["--ds_config", str(CONFIGS / config), "--dataset_dir", str(dataset), "--vl-model", str(backbone),
            "--model-preset", "tiny", "--sensor-window-size", "32", "--num_workers", "0", "--batch_size", "8",
            "--output_dir", str(out), "--set", "train.progress_bar=false", *extra]


def train_rows(out):
    return [r for r in read_metrics(out) if "train/loss" in r]


def final_module(out):
    tag = (Path(out) / "latest").read_text().strip()
    return torch.load(Path(out) / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


@pytest.fixture(scope="module")
def stage1(stage1_run):
    """conftest's Stage 1 run: this module's args("stage1.json", ..., "--epochs", "2", "--lr", "1e-3")."""
    return stage1_run


@pytest.fixture(scope="module")
def stage2(stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "run"
    assert main(args("stage2.json", demo_dataset_dir, tiny_backbone_dir, out, "--stage1-checkpoint", str(stage1),
                     "--grad_accum", "2", "--epochs", "2", "--lora-r", "8")) == 0
    return out


def test_stage2_starts_where_stage1_ended(stage1, stage2):
    s1_val = [r["val/loss"] for r in read_metrics(stage1) if "val/loss" in r]
    first = read_metrics(stage2)[0]
    assert first["step"] == 0 and "val/loss" in first
    assert first["val/loss"] == pytest.approx(s1_val[-1], rel=1e-4)


def test_stage2_starts_from_the_stage1_fp32_masters(stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path,
                                                     monkeypatch):
    """Not from the bf16 module copy in Stage 1's checkpoint, nor from DeepSpeed's masters made
    from the bf16 module: the Stage 1 optimizer's fp32 weights, exactly."""
    start = capture_starting_weights(monkeypatch)
    assert main(args("stage2.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "s2", "--stage1-checkpoint",
                     str(stage1), "--max_steps", "1", "--grad_accum", "1", "--lora-r", "4")) == 0
    want = fp32_masters_from_shards(stage1, ranks=1)["fp32"]
    heads = [k for k in want if k.startswith(("sensor_encoder.", "action_expert."))]
    assert heads and any(not torch.equal(want[k], want[k].bfloat16().float()) for k in heads)  # bf16 would differ
    for name in heads:
        assert torch.equal(start["fp32"][name], want[name]), name


def test_two_learning_rates_keep_their_ratio(stage2):
    rows = train_rows(stage2)
    assert all(r["train/lr/other"] > 0 for r in rows)  # the first update too
    ratios = [r["train/lr/vl"] / r["train/lr/other"] for r in rows]
    assert all(math.isclose(x, 0.1, rel_tol=1e-6) for x in ratios)
    peak = max(r["train/lr/other"] for r in rows)
    assert rows[-1]["train/lr/other"] < peak  # warmup then decay


def test_stage2_checkpoint_holds_adapters_and_heads_not_the_base(stage2):
    module = final_module(stage2)
    backbone_keys = [k for k in module if k.startswith("backbone.")]
    assert backbone_keys and all(".lora_A." in k or ".lora_B." in k for k in backbone_keys)
    assert any(k.startswith("sensor_encoder.") for k in module) and any(k.startswith("action_expert.") for k in module)
    lora_b = [v for k, v in module.items() if ".lora_B." in k]
    assert any(torch.count_nonzero(v) for v in lora_b)  # the adapters did train


def test_research_script_checkpoint_continues_its_epsilon_head(stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path,
                                                                 capsys):
    """The research script's .pt has no head field: it trained the DDPM epsilon head on the
    pooled VL vector, which Stage 2 continues (and says so) although stage2.json asks for
    sample prediction on VL tokens."""
    module = {k: v for k, v in final_module(stage1).items()  # a pooled head of raw features: the script's
              if k != "action_expert.vl_embed" and not k.startswith("action_expert.vl_norm.")}
    torch.save({part: {k[len(part) + 1:]: v for k, v in module.items() if k.startswith(part + ".")}
                for part in ("sensor_encoder", "action_expert")}, tmp_path / "diffusion_epoch2.pt")
    out = tmp_path / "s2"
    assert main(args("stage2.json", demo_dataset_dir, tiny_backbone_dir, out, "--stage1-checkpoint",
                     str(tmp_path / "diffusion_epoch2.pt"), "--max_steps", "1", "--lora-r", "4")) == 0
    saved = json.loads((out / "config.json").read_text())["vla_ds"]["action_expert"]
    assert (saved["objective"], saved["prediction_type"], saved["vl_conditioning"]) == ("diffusion", "epsilon", "pooled")
    assert "epsilon) on the pooled VL vector; continuing with it, not with the config's objective diffusion " \
        "(prediction_type sample) on VL tokens (4x4 per view, joint attention)" in capsys.readouterr().err


def test_standardised_features_keep_their_stage1_statistics(tiny_backbone_dir, demo_dataset_dir, tmp_path,
                                                            monkeypatch):
    """action_expert.vl_normalize: a fresh Stage 1 sets the statistics (from its cache), a
    resume and Stage 2 keep them exactly (Stage 2's backbone is live and changes: they are
    the Stage 1 head's inputs, not recomputed), and the exported policy reads them."""
    from vla_ds.models.policy import VLAPolicy
    from vla_ds.policy_tools.convert import main as convert_main

    s1 = tmp_path / "s1"
    norm = ["--set", "action_expert.vl_normalize=true"]
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, s1, "--max_steps", "4", *norm)) == 0
    stats = {k: v for k, v in final_module(s1).items() if k.startswith("action_expert.vl_norm.")}
    assert set(stats) == {"action_expert.vl_norm.mean", "action_expert.vl_norm.std"}
    assert stats["action_expert.vl_norm.std"].dtype == torch.float32 and (stats["action_expert.vl_norm.std"] != 1).any()
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, s1, "--max_steps", "6", "--resume", str(s1),
                     *norm)) == 0
    start = capture_starting_weights(monkeypatch)
    assert main(args("stage2.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "s2", "--stage1-checkpoint",
                     str(s1), "--max_steps", "1", "--lora-r", "4")) == 0  # its config does not ask: continued
    for k, v in stats.items():
        assert torch.equal(final_module(s1)[k], v), k  # the resumed run did not recompute them
        assert torch.equal(start["module"][k], v), k
        assert torch.equal(final_module(tmp_path / "s2")[k], v), k
    assert convert_main([str(tmp_path / "s2"), str(tmp_path / "policy"), "--to", "policy"]) == 0
    policy = VLAPolicy.from_pretrained(tmp_path / "policy", device="cpu")
    assert policy.action_expert.config.vl_normalize
    assert torch.equal(policy.action_expert.vl_norm.mean, stats["action_expert.vl_norm.mean"])


def test_guide_format_stage1_checkpoint_loads(stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path, monkeypatch):
    module = final_module(stage1)
    guide = {part: {k[len(part) + 1:]: v for k, v in module.items() if k.startswith(part + ".")}
             for part in ("sensor_encoder", "action_expert")}
    head = {"objective": "diffusion", "prediction_type": "sample", "vl_conditioning": "tokens", "vl_grid": 4,
            "vl_attention": "joint", "vl_normalize": False}  # what convert_checkpoint.py --to stage1 adds
    torch.save({**guide, "training_stage": "stage1", "head": head}, tmp_path / "diffusion_epoch2.pt")
    start = capture_starting_weights(monkeypatch)
    assert main(args("stage2.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "s2", "--stage1-checkpoint",
                     str(tmp_path / "diffusion_epoch2.pt"), "--max_steps", "1", "--finetune-vl", "full",
                     "--unfreeze-last-n", "1")) == 0
    for part, state in guide.items():  # the heads start exactly as Stage 1's
        for k, v in state.items():
            assert torch.equal(start["module"][f"{part}.{k}"], v), k
            assert torch.equal(start["fp32"][f"{part}.{k}"], v.float()), k


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "mismatched", "no_stage1"])
def test_bad_stage1_checkpoint_is_one_message(case, stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path, capsys):
    extra = ["--stage1-checkpoint", str(stage1)]
    if case == "missing":
        extra = ["--stage1-checkpoint", str(tmp_path / "nope.pt")]
        expect = [str(tmp_path / "nope.pt"), "does not exist"]
    elif case == "not_a_checkpoint":
        (tmp_path / "notes.pt").write_text("hello")
        extra = ["--stage1-checkpoint", str(tmp_path / "notes.pt")]
        expect = [str(tmp_path / "notes.pt"), "cannot read"]
    elif case == "mismatched":
        extra += ["--set", "action_expert.d_model=32", "--set", "action_expert.dim_feedforward=64"]
        expect = ["mp_rank_00_model_states.pt", "action_expert does not match", "shape mismatches", "in the file but"]
    else:
        extra = []
        expect = ["--stage1-checkpoint"]
    code = main(args("stage2.json", demo_dataset_dir, tiny_backbone_dir, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for piece in expect:
        assert piece in err, (piece, err)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage2_offload"])
def test_resume_continues_exactly(stage, stage1, stage2, tiny_backbone_dir, demo_dataset_dir, tmp_path):
    """k steps, then --resume in a new process (as after a kill), == the uninterrupted run of
    the shipped config, bit for bit: every step's loss and learning rate, the final bf16
    weights and the fp32 master weights. A new process matters: DeepSpeed's CPU Adam (the
    offload configs' optimizer, and FusedAdam on a CPU) keeps beta^t in C++ state that a
    resume used to recompute differently (1-ulp master drift)."""
    stage2_args = ["--stage1-checkpoint", str(stage1), "--grad_accum", "2", "--epochs", "2", "--lora-r", "8"]
    if stage == "stage1":
        full, config, extra = stage1, "stage1.json", ["--epochs", "2", "--lr", "1e-3"]
    elif stage == "stage2":
        full, config, extra = stage2, "stage2.json", stage2_args
    else:
        full, config, extra = tmp_path / "straight", "stage2_offload.json", stage2_args
        assert main(args(config, demo_dataset_dir, tiny_backbone_dir, full, *extra)) == 0
    reference = train_rows(full)
    k = len(reference) // 2 + 1  # mid-epoch 2
    out = tmp_path / "resumed"
    assert main(args(config, demo_dataset_dir, tiny_backbone_dir, out, *extra, "--max_steps", str(k),
                     *same_schedule(full))) == 0
    launched = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this process's group
    env = {k: v for k, v in os.environ.items() if k not in launched} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"),
                           *args(config, demo_dataset_dir, tiny_backbone_dir, out, *extra, "--resume", str(out))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = train_rows(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(resumed, reference):
        assert (a["train/loss"], a["train/lr/other"]) == (b["train/loss"], b["train/lr/other"]), a["step"]
    got, want = final_module(out), final_module(full)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    got, want = fp32_masters_from_shards(out, ranks=1), fp32_masters_from_shards(full, ranks=1)
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        for name in want[kind]:
            assert torch.equal(got[kind][name], want[kind][name]), (kind, name)


def test_resume_refuses_another_backbone(stage1, demo_dataset_dir, tmp_path, capsys):
    from vla_ds.models.tiny_backbone import make_tiny_backbone

    other = make_tiny_backbone(tmp_path / "other_backbone", seed=1)
    code = main(args("stage1.json", demo_dataset_dir, other, tmp_path / "o", "--resume", str(stage1), "--epochs", "3"))
    err = capsys.readouterr().err
    assert code == 2 and "another VL backbone" in err and "Traceback" not in err


@pytest.mark.parametrize("config", ["stage2_offload.json", "stage3_offload.json"])
def test_offload_configs_train(config, stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path):
    shipped = json.loads((CONFIGS / config).read_text())
    reference = json.loads((CONFIGS / "stage2.json").read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert shipped[key] == reference[key]  # the same effective global batch
    assert "description" in shipped and shipped["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    out = tmp_path / "run"
    linear = torch.nn.functional.linear
    ema = ["--set", "ema.enabled=true"]  # the average of partitioned (ZeRO-3) and offloaded weights too
    assert main(args(config, demo_dataset_dir, tiny_backbone_dir, out, "--stage1-checkpoint", str(stage1),
                     "--grad_accum", "2", "--max_steps", "4", "--lora-r", "4", "--set", "train.warmup_ratio=0",
                     *ema)) == 0
    # ZeRO-3 swaps torch's linear process-wide; the run puts it back for whatever runs next.
    assert torch.nn.functional.linear is linear
    rows = train_rows(out)
    assert len(rows) == 4 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert (out / "latest").read_text().strip() == "global_step4"
    # ...and resumes (ZeRO-3 names its rank files differently).
    assert main(args(config, demo_dataset_dir, tiny_backbone_dir, out, "--stage1-checkpoint", str(stage1),
                     "--grad_accum", "2", "--max_steps", "6", "--lora-r", "4", "--set", "train.warmup_ratio=0",
                     "--resume", str(out), *ema)) == 0
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5, 6]
    _, states = read_model_states(out)
    average = states["ema"]["shadow"]
    assert states["ema"]["step"] == 6  # continued across the resume
    lora = [k for k in average if ".lora_A." in k]
    assert lora and all(average[k].shape == (4, 64) for k in lora)  # whole tensors, not ZeRO-3's partitions
    assert average["action_expert.head.weight"].shape == (7, 64)
    assert all(torch.isfinite(v).all() for v in average.values())


def test_resume_after_a_stop_at_an_epoch_end_does_not_redo_it(stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path,
                                                              capsys):
    per_epoch = len(train_rows(stage1)) // 2
    out = tmp_path / "run"
    common = ["--epochs", "2", "--lr", "1e-3"]
    capsys.readouterr()
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, out, *common, "--max_steps", str(per_epoch))) == 0
    warmup = max(1, round(0.05 * per_epoch))  # --max_steps sized the schedule (train.warmup_ratio 0.05)
    assert (f"{per_epoch} optimizer steps per epoch, {per_epoch} in this run (--max_steps, 1.00 epochs); "
            f"learning-rate schedule WarmupCosineLR: warmup {warmup}, total {per_epoch} steps") in capsys.readouterr().err
    saved = (out / f"global_step{per_epoch}" / "mp_rank_00_model_states.pt").stat().st_mtime_ns
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, out, *common, "--resume", str(out))) == 0
    err = capsys.readouterr().err  # two epochs now: the schedule is not the checkpoint's, and the log says so
    assert f"ran a learning-rate schedule of {per_epoch} total / {warmup} warmup steps; this run's is " \
           f"{2 * per_epoch} / {round(0.05 * 2 * per_epoch)}" in err, err[-2000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "val/loss" in r] == [per_epoch, 2 * per_epoch]
    assert (out / f"global_step{per_epoch}" / "mp_rank_00_model_states.pt").stat().st_mtime_ns == saved


@pytest.mark.parametrize("config", ["stage2.json", "stage2_offload.json", "stage3_offload.json"])
def test_one_gradient_reduction_per_step_trains_the_same(config, stage1, tiny_backbone_dir, demo_dataset_dir,
                                                         tmp_path):
    """train.coalesce_grad_reduction (on by default) reduces the accumulated gradients once per
    optimizer step instead of once per micro batch under ZeRO-1/2: the same losses and
    gradient norms as ZeRO's per-micro-batch reduction. ZeRO-3 keeps its own (the flag is a
    no-op there: identical runs)."""
    runs = {}
    for coalesce in (True, False):
        out = tmp_path / f"coalesce_{coalesce}"
        assert main(args(config, demo_dataset_dir, tiny_backbone_dir, out, "--stage1-checkpoint", str(stage1),
                         "--grad_accum", "3", "--max_steps", "4", "--lora-r", "4", "--lr", "1e-3",
                         "--set", "train.warmup_ratio=0", "--set", f"train.coalesce_grad_reduction={coalesce}")) == 0
        runs[coalesce] = read_metrics(out)
    on, off = ([r for r in rows if "train/loss" in r] for rows in (runs[True], runs[False]))
    assert [r["step"] for r in on] == [r["step"] for r in off] == [1, 2, 3, 4]
    if config == "stage3_offload.json":
        assert [(r["train/loss"], r["train/grad_norm"]) for r in on] == \
            [(r["train/loss"], r["train/grad_norm"]) for r in off]
        return
    # Step 1: the same weights and batches, so the same loss; the gradient differs only by
    # rounding (the fp32 sum rounded to bf16 once, against each micro batch's gradient
    # reduced on its own: under 2^-8 relative per element, so in the norm too);
    # tests/test_trainer.py bounds that rounding element by element.
    assert on[0]["train/loss"] == off[0]["train/loss"]
    assert on[0]["train/grad_norm"] == pytest.approx(off[0]["train/grad_norm"], rel=2 ** -8)
    # Later steps: that rounding grows through bf16 forwards (and Adam turns the rounding noise
    # of exactly-zero gradients, such as attention key biases, into full-size updates), but a
    # gradient summed twice or left over from the previous step would be off by far more.
    for a, b in zip(on[1:], off[1:]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=2e-2)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=2e-2)
    val_on, val_off = ([r["val/loss"] for r in rows if "val/loss" in r] for rows in (runs[True], runs[False]))
    assert val_on[-1] == pytest.approx(val_off[-1], rel=2e-2)


def test_max_steps_beyond_the_epochs_runs_those_steps(stage1, tiny_backbone_dir, demo_dataset_dir, tmp_path):
    """HF Trainer's max_steps: `--epochs 1 --max_steps N` trains N steps even past one epoch,
    and the config keeps the epochs the user gave."""
    per_epoch = len(train_rows(stage1)) // 2
    out = tmp_path / "run"
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, out, "--epochs", "1", "--lr", "1e-3",
                     "--max_steps", str(per_epoch + 2))) == 0
    assert [r["step"] for r in train_rows(out)] == list(range(1, per_epoch + 3))
    assert [r["step"] for r in read_metrics(out) if "val/loss" in r] == [per_epoch, per_epoch + 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["vla_ds"]["train"]["epochs"] == 1
    assert saved["scheduler"]["params"]["total_num_steps"] == per_epoch + 2
    # Resumed with the same flags after its last step (a requeued job): nothing more is trained.
    assert main(args("stage1.json", demo_dataset_dir, tiny_backbone_dir, out, "--epochs", "1", "--lr", "1e-3",
                     "--max_steps", str(per_epoch + 2), "--resume", str(out))) == 0
    assert [r["step"] for r in train_rows(out)] == list(range(1, per_epoch + 3))
    assert (out / "latest").read_text().strip() == f"global_step{per_epoch + 2}"
