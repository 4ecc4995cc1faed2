"""Engine checkpoints read by hand, independently of DeepSpeed's conversion tools."""

import re
from collections import defaultdict
from pathlib import Path

import torch


def latest_tag_dir(out: Path) -> Path:
    return out / (out / "latest").read_text().strip()


def model_states(out: Path) -> dict:
    return torch.load(latest_tag_dir(out) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)


def fp32_masters_from_shards(out: Path, ranks: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 weights and Adam moments of every trainable parameter, put together by hand from
    each rank's optimizer shard (ZeRO-2's, or ZeRO-1 + bf16's BF16_Optimizer's: both carry
    param_slice_mappings), independently of DeepSpeed's tools."""
    tag_dir = latest_tag_dir(out)
    shapes = {}
    for group in model_states(out)["param_shapes"]:
        shapes.update(group)
    pieces = defaultdict(lambda: defaultdict(list))
    files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name)[1]))
    assert len(files) == ranks
    for file in files:
        osd = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flats = {"fp32": osd["single_partition_of_fp32_groups"][g],
                     "exp_avg": osd["base_optimizer_state"]["state"][g]["exp_avg"],
                     "exp_avg_sq": osd["base_optimizer_state"]["state"][g]["exp_avg_sq"]}
            for name, frag in mapping.items():
                for key, flat in flats.items():
                    pieces[key][name].append(flat.narrow(0, frag.start, frag.numel))
    return {key: {name: torch.cat(p).view(shapes[name]) for name, p in by_name.items()}
            for key, by_name in pieces.items()}


def capture_starting_weights(monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """Fill the returned dict, when ``train.main`` hands its engine to the training loop, with
    every trainable parameter's fp32 master ("fp32") and bf16 module copy ("module"), and every
    buffer in both: the weights the run starts from, before its first update."""
    from deepspeed.utils import safe_get_full_fp32_param

    from vla_ds.training import trainer

    seen: dict[str, dict[str, torch.Tensor]] = {}
    train = trainer.train

    def spy(cfg, engine, *args, **kwargs):
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        seen["fp32"] = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in named}
        seen["module"] = {n: p.detach().clone() for n, p in named}
        for n, b in engine.module.named_buffers():  # the statistics the heads read (fp32 either way)
            seen["fp32"][n] = seen["module"][n] = b.detach().clone()
        return train(cfg, engine, *args, **kwargs)

    monkeypatch.setattr(trainer, "train", spy)
    return seen


def same_schedule(run: Path) -> list[str]:
    """``--set`` arguments giving a run the resolved learning-rate schedule of ``run`` (its
    config.json): a run stopped early with ``--max_steps`` (which sizes an "auto" schedule)
    then keeps the schedule of the longer run it is compared with."""
    import json

    params = json.loads((run / "config.json").read_text())["scheduler"]["params"]
    return [arg for key in ("total_num_steps", "warmup_num_steps")
            for arg in ("--set", f"scheduler.params.{key}={params[key]}")]
