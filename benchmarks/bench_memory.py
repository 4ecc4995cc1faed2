"""Measured memory per rank of the Stage 2 configs next to scripts/estimate_memory.py.

    python benchmarks/bench_memory.py [--json out.json]

A mid-size policy (the tiny offline Qwen2.5-VL with LoRA r=16 and mid-size heads, about
5.8M trainable parameters) trains Stage 2 for a few steps on the demo dataset with each
of stage2.json, stage2_offload.json and stage3_offload.json, on 1 and on 2 ranks. For
every rank it records the peak memory of the process (CUDA max allocated on a GPU, peak
RSS here on CPU, which includes the ~0.5 GB Python/torch runtime) and the bytes of its
ZeRO optimizer shard in the checkpoint (fp32 master weights + Adam moments: the
optimizer state that rank holds). Next to them: the estimate of estimate_memory.py for
the same model, config and rank count. Checks that 2-rank ZeRO-2 holds half the
optimizer state per rank of 1 rank. Prints a table, writes JSON. Run by hand.

    python benchmarks/bench_memory.py --startup [--reference-dir DIR] [--ranks 2] [--json out.json]

Start-up host memory instead: the reference Qwen2.5-VL-3B (random bf16 weights, about 7.5 GB,
written to ``--reference-dir`` once and reused) loaded by ``--ranks`` processes at once, each
the way train.py loads it (``engine.backbone_device``: straight onto ``cuda:LOCAL_RANK``
on a GPU box, memory-mapped on the CPU). Per rank: peak RSS, and after the load its
private (anonymous) memory and its file-backed pages (the checkpoint's page cache, one copy
shared by all ranks of the machine), plus GPU memory on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("stage2.json", "stage2_offload.json", "stage3_offload.json")
CHANNELS, WINDOW = 16, 32
MID_HEADS = {  # the "mid" size of bench_step.py
    "sensor_encoder": {"conv_channels": [128, 256], "d_model": 256, "num_layers": 2, "num_heads": 8,
                       "dim_feedforward": 1024, "out_dim": 512},
    "action_expert": {"vl_feature_dim": 512, "d_model": 256, "num_layers": 4, "num_heads": 8,
                      "dim_feedforward": 1024},
}
MARK = "BENCH_MEMORY "


def head_overrides() -> list[str]:
    out = []
    for section, values in MID_HEADS.items():
        for key, value in values.items():
            out += ["--set", f"vla_ds.{section}.{key}={json.dumps(value)}"]
    return out


def train_args(config: str, data: Path, backbone: Path, out: Path, *extra: str) -> list[str]:
    return ["--ds_config", str(REPO / "ds_configs" / config), "--dataset_dir", str(data), "--vl-model", str(backbone),
            "--model-preset", "tiny", "--sensor-window-size", str(WINDOW), "--num_workers", "0",
            "--batch_size", "8", "--lr", "1e-3", "--output_dir", str(out), "--set", "train.progress_bar=false",
            *head_overrides(), *extra]


def child(argv: list[str]) -> int:
    """One rank: train, then print its peak memory as a JSON line."""
    import torch

    from vla_ds.training.train import main

    code = main(argv)
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    print(MARK + json.dumps({"rank": int(os.environ.get("RANK", "0")), "peak_bytes": peak, "kind": kind}),
          flush=True)
    return code


def run_ranks(ranks: int, args: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    script = [str(Path(__file__).resolve()), "--child"]
    if ranks == 1:
        cmd = [sys.executable, *script, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), *script, *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line.split(MARK, 1)[1]) for line in proc.stdout.splitlines() if MARK in line]
    return sorted(rows, key=lambda r: r["rank"])


def optimizer_shard_bytes(out: Path) -> list[int]:
    """Size of each rank's ZeRO optimizer shard in the newest checkpoint, by rank."""
    import re

    tag = out / (out / "latest").read_text().strip()
    files = {int(re.search(r"zero_pp_rank_(\d+)_", p.name)[1]): p.stat().st_size for p in tag.glob("*optim_states.pt")}
    return [files[r] for r in sorted(files)]


def estimate(config: str, backbone: Path, ranks: int, tmp: Path) -> dict:
    """estimate_memory.py for the same model: the shipped JSON with the mid heads written in."""
    import importlib.util

    raw = json.loads((REPO / "ds_configs" / config).read_text())
    section = raw.setdefault("vla_ds", {})
    section["model_preset"] = "tiny"
    for name, values in MID_HEADS.items():
        section[name] = {**section.get(name, {}), **values}
    section["sensor_encoder"]["in_channels"] = CHANNELS
    section.setdefault("data", {})["sensor_window_size"] = WINDOW
    path = tmp / f"estimate_{config}"
    path.write_text(json.dumps(raw))
    spec = importlib.util.spec_from_file_location("estimate_memory", REPO / "scripts" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp / f"estimate_{config}_{ranks}.json"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        assert module.main(["--ds_config", str(path), "--num_gpus", str(ranks), "--vl-model", str(backbone),
                            "--micro-batch", "8", "--image-size", "64x48", "--json", str(out)]) == 0
    return json.loads(out.read_text())["estimate_bytes"]


def startup_child(backbone: str) -> int:
    """One rank: load the backbone (and fingerprint it) as train.py does, print its memory as a
    JSON line."""
    import torch

    from vla_ds.models.backbone import VLBackbone
    from vla_ds.training import config as config_lib
    from vla_ds.training.engine import backbone_device

    raw = config_lib.load_json(REPO / "ds_configs" / "stage2.json")
    config_lib.apply_override(raw, "vla_ds.backbone.model_name_or_path", backbone)
    cfg = config_lib.resolve_config(raw, 1, for_run=False)
    device = backbone_device(cfg)
    backbone = VLBackbone(cfg.backbone, device=device)
    backbone.fingerprint()  # train.py reads every weight for it
    with open("/proc/self/status") as f:
        status = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)
                  if k in ("VmHWM", "RssAnon", "RssFile")}
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    del backbone
    print(MARK + json.dumps({"rank": int(os.environ.get("RANK", "0")), "device": device or "cpu",
                             "peak_rss": status["VmHWM"], "private": status["RssAnon"],
                             "file_backed": status["RssFile"], "gpu_max_allocated": gpu}), flush=True)
    return 0


def startup(reference_dir: Path, ranks: int) -> list[dict]:
    from vla_ds.models.tiny_backbone import make_reference_backbone

    if not (reference_dir / "model.safetensors").is_file() and not any(reference_dir.glob("*.safetensors")):
        print(f"writing the reference-size backbone to {reference_dir} (about 7.5 GB, once)", flush=True)
        make_reference_backbone(reference_dir)
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--startup-child",
                                       str(reference_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"a loading rank failed:\n{err[-2000:]}")
        rows += [json.loads(line.split(MARK, 1)[1]) for line in out.splitlines() if MARK in line]
    rows.sort(key=lambda r: r["rank"])
    gib = 1024 ** 3
    print()
    print(f"{'rank':>4}{'device':>10}{'peak RSS GiB':>14}{'private GiB':>13}{'file-backed GiB':>17}{'GPU GiB':>9}")
    for r in rows:
        print(f"{r['rank']:>4}{r['device']:>10}{r['peak_rss'] / gib:>14.2f}{r['private'] / gib:>13.2f}"
              f"{r['file_backed'] / gib:>17.2f}{r['gpu_max_allocated'] / gib:>9.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:  # under the DeepSpeed launcher a --local_rank=N comes first
        argv.remove("--child")
        return child(argv)
    if argv[:1] == ["--startup-child"]:
        return startup_child(argv[1])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--startup", action="store_true", help="start-up host memory of the reference backbone instead")
    p.add_argument("--reference-dir", type=Path, default=REPO / ".cache" / "reference_backbone")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if a.startup:
        rows = startup(a.reference_dir, a.ranks)
        if a.json:
            a.json.write_text(json.dumps({"startup": rows}, indent=2) + "\n")
            print(f"wrote {a.json}")
        return 0

    from vla_ds.data.demo import make_demo_dataset
    from vla_ds.models.tiny_backbone import make_tiny_backbone

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = make_tiny_backbone(tmp / "tiny")
        data = make_demo_dataset(tmp / "data", (4, 3))
        stage1 = tmp / "stage1"
        run_ranks(1, train_args("stage1.json", data, backbone, stage1, "--max_steps", "2", "--epochs", "1"))
        for config in a.configs:
            for ranks in (1, 2):
                out = tmp / f"{config}_{ranks}"
                measured = run_ranks(ranks, train_args(config, data, backbone, out, "--stage1-checkpoint", str(stage1),
                                                       "--lora-r", "16", "--max_steps", "3", "--epochs", "1",
                                                       "--grad_accum", str(2 // ranks)))
                shards = optimizer_shard_bytes(out)
                est = estimate(config, backbone, ranks, tmp)
                rows.append({"config": config, "ranks": ranks, "peak_bytes_per_rank": [m["peak_bytes"] for m in measured],
                             "peak_kind": measured[0]["kind"], "optimizer_shard_bytes_per_rank": shards,
                             "estimate_bytes": est})
                print(f"{config} x{ranks}: done", flush=True)
    mib = 1024 ** 2
    print()
    print(f"{'config':<22}{'ranks':>6}{'peak MiB/rank':>15}{'optim shard MiB/rank':>22}"
          f"{'est. GPU total MiB':>20}{'est. optimizer MiB':>20}{'est. CPU MiB':>14}")
    for r in rows:
        e = r["estimate_bytes"]
        print(f"{r['config']:<22}{r['ranks']:>6}{max(r['peak_bytes_per_rank']) / mib:>15.0f}"
              f"{max(r['optimizer_shard_bytes_per_rank']) / mib:>22.2f}{e['total'] / mib:>20.1f}"
              f"{(e['optimizer_states'] + e['cpu_optimizer_states']) / mib:>20.2f}{e['cpu_total'] / mib:>14.1f}")
    z2 = {r["ranks"]: max(r["optimizer_shard_bytes_per_rank"]) for r in rows if r["config"] == "stage2.json"}
    result = {"rows": rows, "peak_kind": rows[0]["peak_kind"] if rows else None}
    if 1 in z2 and 2 in z2:
        result["zero2_optimizer_ratio_2_vs_1_rank"] = z2[2] / z2[1]
        print(f"\nZeRO-2 optimizer shard per rank, 2 ranks / 1 rank: {z2[2] / z2[1]:.3f} (half: 0.5)")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
