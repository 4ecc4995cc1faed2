"""engine.MicroSteps on a real DeepSpeed engine (one rank, in-process): one gradient
reduction per optimizer step that adds the micro batches up in fp32."""


import torch
from policy_helpers import stage1_policy_and_batches

from vla_ds.training import distributed
from vla_ds.training import engine as engine_lib
from vla_ds.training.engine import MicroSteps


def test_one_reduction_per_step_reduces_the_fp32_sum_of_the_micro_batches(tiny_backbone_dir):
    """ZeRO-2, bf16 weights, grad_accum_dtype fp32 (ds_configs/stage1.json at stage 2), 8 micro batches:
    what the step's one reduction receives is each parameter's micro-batch gradients added
    in fp32 and rounded to bf16 once (a bf16 running sum, what autograd alone would keep,
    is measurably off), and the update happens at the 8th micro batch only."""
    accum = 8
    # ZeRO-2 (stage1.json ships ZeRO-1, whose BF16_Optimizer reduces once per step anyway);
    # the first update is not warmup's lr 0.
    overrides = ["zero_optimization.stage=2", "scheduler.params.warmup_min_ratio=1"]
    cfg, policy, batches = stage1_policy_and_batches(tiny_backbone_dir, 4, accum, overrides)
    distributed.init_distributed(5)
    engine, _ = engine_lib.initialize(policy, cfg)
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    steps = MicroSteps(engine, seed=0, rank=0, accum=accum, coalesce=True)
    assert steps.coalesce and steps._params

    micro_grads: dict[int, list[torch.Tensor]] = {}  # param -> its gradient from each micro batch
    add = steps._add_gradients

    def record(last):
        for p in steps._params:
            if p.grad is not None:
                micro_grads.setdefault(id(p), []).append(p.grad.detach().clone())
        add(last)

    steps._add_gradients = record
    reduced: dict[int, torch.Tensor] = {}
    optimizer = engine.optimizer
    reduce = optimizer.reduce_ready_partitions_and_remove_grads

    def capture(param, i):
        if param.grad is not None:
            reduced[id(param)] = param.grad.detach().clone()
        return reduce(param, i)

    optimizer.reduce_ready_partitions_and_remove_grads = capture
    before = [p.detach().clone() for p in steps._params]
    for k, batch in enumerate(batches):
        out, lrs = steps(batch, step=0, k=k)
        assert (lrs is None) == (k < accum - 1)
        if k < accum - 1:  # no update before the cycle's end
            assert all(torch.equal(a, p) for a, p in zip(before, steps._params))
    assert engine.global_steps == 1 and not all(torch.equal(a, p) for a, p in zip(before, steps._params))

    assert reduced.keys() == micro_grads.keys() and len(reduced) == len(steps._params)
    assert all(len(g) == accum for g in micro_grads.values())
    one_rounding = bf16_running_sum_off = 0
    for key, grads in micro_grads.items():
        exact = torch.stack([g.double() for g in grads]).sum(0)
        bound = 2.0 ** -8 * exact.abs() + 1e-30  # one bf16 rounding of the exact sum
        one_rounding += int(((reduced[key].double() - exact).abs() > bound).sum())
        running = torch.zeros_like(grads[0])
        for g in grads:
            running += g  # in bf16
        bf16_running_sum_off += int(((running.double() - exact).abs() > bound).sum())
    assert one_rounding == 0
    assert bf16_running_sum_off > 0  # the bound tells the two apart


def test_seed_generators_draws_what_torch_manual_seed_draws():
    """The per-micro-batch reseed (CPU generator and the engine device's only) gives the
    same random stream as torch.manual_seed, so resumed runs draw what they drew before."""
    from vla_ds.training.engine import seed_generators

    torch.manual_seed(1234)
    expected = torch.rand(5), torch.randn(3)
    torch.manual_seed(99)
    seed_generators(1234, torch.device("cpu"))
    got = torch.rand(5), torch.randn(3)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    seed_generators(1235, torch.device("cpu"))
    assert not torch.equal(torch.rand(5), expected[0])


def test_short_sensor_windows_train_with_finite_losses(tiny_backbone_dir):
    """--sensor-window-size 1, 2 and 3 with a 4-channel state as the sensor (what Meta-World
    data gives): every step's loss and gradient norm are finite and no update is skipped.
    Windows 1 and 2 once skipped a third of their steps (a CPU bf16 conv bug at length 1)."""
    distributed.init_distributed(5)
    for window in (1, 2, 3):
        cfg, policy, (batch,) = stage1_policy_and_batches(tiny_backbone_dir, 16, 1, channels=4, window=window)
        engine, _ = engine_lib.initialize(policy, cfg)
        steps = MicroSteps(engine, seed=0, rank=0, accum=1, coalesce=False)
        for step in range(6):  # one batch, a new draw of noise and timesteps each step
            out, _ = steps(batch, step=step, k=0)
            assert torch.isfinite(out["loss"]), (window, step)
            norm = engine.get_global_grad_norm()
            assert norm is not None and 0 < float(norm) < 1e3, (window, step, norm)
        assert engine.skipped_steps == 0, window
