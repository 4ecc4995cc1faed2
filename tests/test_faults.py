"""Reliability: the scenarios of scripts/fault_drill.py as tests (kills during and after a
save, non-finite steps, bad input, skipped samples, a dead DataLoader worker), plus the
checkpoint atomicity and retention rules on their own. The dead-rank scenario is in
tests/test_multinode.py."""

import json
from pathlib import Path

import pytest

from vla_ds.errors import CheckpointError
from vla_ds.training import checkpoint
from vla_ds.training import fault_drill as drill


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One Stage 1 VL feature cache for the module's runs (they all train on the session's
    demo dataset), built by the first run that needs it instead of once per test."""
    return tmp_path_factory.mktemp("fault_feature_cache")


@pytest.fixture
def ctx(tmp_path, tiny_backbone_dir, demo_dataset_dir, feature_cache):
    context = drill.Context(tmp_path, backbone=tiny_backbone_dir, data=demo_dataset_dir)
    context.common = ["--set", f"cache.dir={feature_cache}"]
    return context


@pytest.mark.parametrize("scenario", ["kill_in_save", "kill_and_resume", "nan_forever",
                                      "skip_bad_samples", "worker_killed"])
def test_fault_scenario_loses_nothing(scenario, ctx):
    ok, what, lost = drill.SCENARIOS[scenario](ctx)
    assert ok, what
    assert lost.startswith("none") or scenario == "skip_bad_samples"


ZERO = {"zero1": [],  # stage1.json: ZeRO-1 + bf16, DeepSpeed's BF16_Optimizer
        "zero2": ["--set", "zero_optimization.stage=2"],  # DeepSpeedZeroOptimizer, as stage2.json
        "zero2_offload": ["--set", "zero_optimization.stage=2", "--set", "zero_optimization.offload_optimizer.device=cpu"]}


@pytest.mark.parametrize("zero,accum", [("zero1", 1), ("zero1", 2), ("zero2", 2), ("zero2_offload", 1)])
def test_skipped_steps_are_counted_and_leave_the_weights(zero, accum, ctx, monkeypatch, capsys):
    """NaN loss at steps 5-6: those two updates are skipped (counted in metrics.jsonl), the
    run goes on, and the weights after step 6 equal those after step 4. With accumulation 2
    the NaN is in step 5's last micro batch and step 6's first (under ZeRO-2, with one
    gradient reduction per step). With the optimizer offloaded (stage2_offload.json's
    ZeRO-2), DeepSpeed alone would keep the NaN gradient and skip every later step.

    The run is in this process, the NaN injected as ``fault_drill child --nan-steps`` injects
    it (that child process itself runs in the nan_forever scenario)."""
    from vla_ds.models.policy import VLAPolicy
    from vla_ds.training.metrics import read_metrics
    from vla_ds.training.train import main

    out = ctx.root / "nan"
    args = drill.train_args(ctx.data, ctx.backbone, out, "--epochs", "1", "--save_steps", "2",
                            "--grad_accum", str(accum), *ZERO[zero], *ctx.common)
    monkeypatch.setattr(VLAPolicy, "forward", VLAPolicy.forward)  # the real forward is back after the test
    drill.inject_nan_steps(*((5, 6) if accum == 1 else (10, 11)))  # training forward calls
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    rows = {r["step"]: r for r in read_metrics(out) if "train/loss" in r}
    assert [rows[s]["train/skipped_steps"] for s in (4, 5, 6, 7)] == [0, 1, 2, 2]
    assert rows[5]["train/loss"] is None and rows[7]["train/loss"] is not None  # NaN written as null
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))
    assert drill.states_equal(drill.final_state(out, "global_step4"), drill.final_state(out, "global_step6"))
    assert not drill.states_equal(drill.final_state(out, "global_step6"), drill.final_state(out, "global_step8"))


@pytest.mark.parametrize("case", list(drill.bad_input_cases()))
def test_bad_input_is_one_message_naming_the_file(case, ctx, capsys):
    import shutil

    from vla_ds.training.train import main

    mutate, expect = drill.bad_input_cases()[case]
    data = ctx.root / "data"
    shutil.copytree(ctx.data, data)
    target = mutate(data)
    code = main(drill.train_args(data, ctx.backbone, ctx.root / "out", "--max_steps", "1", *ctx.common))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1 and str(target) in errors[0] and expect in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_resume_refuses_a_missing_dir(ctx, capsys):
    from vla_ds.training.train import main

    missing = ctx.root / "nothing_here"
    assert main(drill.train_args(ctx.data, ctx.backbone, ctx.root / "out", "--resume", str(missing),
                                 *ctx.common)) == 2
    err = capsys.readouterr().err
    assert f"error: {missing}: checkpoint directory does not exist" in err and "Traceback" not in err


# --------------------------------------------------------------------------- checkpoint rules


def fake_tag(out: Path, step: int, complete: bool = True) -> Path:
    tag = out / f"global_step{step}"
    tag.mkdir(parents=True)
    (tag / checkpoint.MODEL_STATES_FILES[0]).write_bytes(b"x")
    if not complete:
        (tag / checkpoint.INCOMPLETE_MARK).write_text("")
    return tag


def test_half_written_checkpoint_is_refused_with_the_way_out(tmp_path):
    fake_tag(tmp_path, 10)
    half = fake_tag(tmp_path, 20, complete=False)
    (tmp_path / "latest").write_text("global_step10")
    assert checkpoint.resolve_checkpoint_dir(tmp_path) == (tmp_path, "global_step10")
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve_checkpoint_dir(half)
    assert str(e.value).startswith(f"{half}: half-written checkpoint (its save was interrupted")
    assert str(tmp_path / "global_step10") in str(e.value)
    (tmp_path / "latest").write_text("global_step20")  # e.g. written by another tool
    with pytest.raises(CheckpointError, match="half-written"):
        checkpoint.resolve_checkpoint_dir(tmp_path)


def test_prune_keeps_the_newest_complete_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        fake_tag(tmp_path, step)
    fake_tag(tmp_path, 35, complete=False)  # an interrupted save older than the newest complete one
    fake_tag(tmp_path, 50, complete=False)  # a save in progress
    (tmp_path / "latest").write_text("global_step40")
    removed = checkpoint.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["global_step10", "global_step20", "global_step35"]
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step30", "global_step40", "global_step50"]


@pytest.mark.parametrize("message", [
    "DataLoader worker (pid 4242) is killed by signal: Killed. ",  # from torch's SIGCHLD handler
    "DataLoader worker (pid(s) 4242) exited unexpectedly",  # from the loader's queue timeout check
    "DataLoader worker (pid(s) 17, 4242) exited unexpectedly",
])
def test_dead_worker_is_named_in_either_of_torchs_messages(message):
    from vla_ds.data.loading import describe_worker_death

    class Tracked:
        def describe_worker(self, pid):
            return "sample 7 (episode_003 at t=1.2)" if pid == 4242 else None

    line = describe_worker_death(message, [Tracked()])
    assert line.startswith("a DataLoader worker died while loading sample 7 (episode_003 at t=1.2)"), line
