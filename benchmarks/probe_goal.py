"""How well do the backbone's image tokens say where reach-v3's goal is? A linear probe.

    python benchmarks/probe_goal.py [--backbone DIR] [--seeds 400] [--train 45 320]
        [--image-size 128] [--grid 4] [--cameras corner2[,corner,...]] [--json out.json]

Renders reach-v3 after its first step (the goal marker moves to the episode's goal there, not
at reset) for ``--seeds`` seeds, runs the backbone once with every hidden layer, and fits ridge
regression from features to the goal's (x, y, z) on the first N seeds for each ``--train`` N,
tested on the last 100. Features: each layer's image tokens pooled to the ``--grid`` cells
(layer 0 is the vision tower's merged output, the last is what ``vl_conditioning: tokens``
caches), and the raw image averaged to 16 x 16 as the reference. The table gives, for the
best of a few ridge strengths (an upper bound of a linear readout), R^2 per axis and the
fraction of held-out goals the readout puts within 5 cm: reach-v3's success radius, so the
success a policy that reads the goal linearly and then moves perfectly would get.

Without ``--backbone`` the tiny random-weight backbone every test uses is made in a temporary
directory. Needs the ``sim`` extra and ``MUJOCO_GL=egl`` (or ``osmesa``); about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SUCCESS_RADIUS = 0.05  # metres: reach-v3 succeeds when the hand is this close to the goal
RIDGE = (1.0, 10.0, 100.0, 1000.0)
TEST = 100


def render_goals(seeds: int, image_size: int, cameras: tuple[str, ...]) -> tuple[list[dict], np.ndarray]:
    from vla_ds.sim.metaworld import MetaWorldEnv

    env = MetaWorldEnv("reach-v3", image_size=image_size, cameras=cameras, rendering="fast")
    images, goals = [], []
    try:
        for seed in range(seeds):
            env.reset(seed)
            env.step(np.zeros(4))
            images.append(env.render())
            goals.append(np.array(env.env._target_pos))  # Meta-World keeps the goal privately
    finally:
        env.close()
    return images, np.array(goals)


def features(backbone_dir: Path, images: list[np.ndarray], grid: int) -> dict[str, np.ndarray]:
    """name -> (N, D): every hidden layer's image tokens on the grid, and the raw image at 16x16."""
    from vla_ds.models.backbone import BackboneConfig, VLBackbone, VLInputBuilder

    config = BackboneConfig(model_name_or_path=str(backbone_dir), dtype="float32")
    backbone, builder = VLBackbone(config).eval(), VLInputBuilder.from_pretrained(config)
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(images), 50):
            chunk = images[start:start + 50]
            batch = builder([[image] for image in chunk], ["reach the goal"] * len(chunk))
            is_image = batch["input_ids"] == backbone.image_token_id
            hidden = backbone.vl_model(**batch, mm_token_type_ids=is_image.to(torch.int32), use_cache=False,
                                       output_hidden_states=True, return_dict=True).hidden_states
            for layer, h in enumerate(hidden):
                cells = backbone.view_cells(h.float()[is_image], batch["image_grid_thw"], grid)
                out.setdefault(f"tokens layer {layer}", []).append(cells.reshape(len(chunk), -1).numpy())
            pixels = torch.tensor(np.stack(chunk)).permute(0, 3, 1, 2).float()
            out.setdefault("pixels 16x16", []).append(F.adaptive_avg_pool2d(pixels, 16).flatten(1).numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def probe(x: np.ndarray, goals: np.ndarray, n_train: int) -> dict:
    """Ridge from x to goals on the first n_train rows, tested on the last TEST; the best strength."""
    train, test = slice(0, n_train), slice(len(x) - TEST, len(x))
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    y_mean = goals[train].mean(0)
    best = None
    for lam in RIDGE:
        w = np.linalg.solve(x[train].T @ x[train] + lam * np.eye(x.shape[1]), x[train].T @ (goals[train] - y_mean))
        pred = x[test] @ w + y_mean
        r2 = 1 - ((pred - goals[test]) ** 2).sum(0) / ((goals[test] - goals[test].mean(0)) ** 2).sum(0)
        within = float((np.linalg.norm(pred - goals[test], axis=1) < SUCCESS_RADIUS).mean())
        if best is None or within > best["within_5cm"]:
            best = {"ridge": lam, "r2_xyz": [round(float(v), 3) for v in r2], "within_5cm": within}
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", type=Path, help="a Qwen2.5-VL directory (default: the tiny random one)")
    p.add_argument("--seeds", type=int, default=400)
    p.add_argument("--train", type=int, nargs="+", default=[45, 300], help="training goals per probe")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--cameras", default="corner2",
                   help="comma-separated Meta-World cameras (vla-record-sim --cameras): features of all, side by side")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if max(a.train) + TEST > a.seeds:
        p.error(f"--seeds must cover the largest --train plus {TEST} test goals")

    from vla_ds.sim.metaworld import parse_cameras

    cameras = parse_cameras(a.cameras)
    images, goals = render_goals(a.seeds, a.image_size, cameras)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = a.backbone
        if backbone is None:
            from vla_ds.models.tiny_backbone import make_tiny_backbone

            backbone = make_tiny_backbone(Path(tmp) / "tiny_backbone")
        per_view = [features(backbone, [views[key] for views in images], a.grid) for key in images[0]]
        feats = {name: np.concatenate([f[name] for f in per_view], axis=1) for name in per_view[0]}

    rows = [{"features": name, "dims": x.shape[1], "train_goals": n, **probe(x, goals, n)}
            for name, x in feats.items() for n in a.train]
    print(f"reach-v3 goal from {a.image_size} px images of {a.cameras}, {TEST} held-out goals, grid {a.grid}x{a.grid}")
    print(f"{'features':<16} {'dims':>5} {'train':>6}   R^2 x / y / z          within 5 cm")
    for r in rows:
        r2 = " / ".join(f"{v:6.2f}" for v in r["r2_xyz"])
        print(f"{r['features']:<16} {r['dims']:>5} {r['train_goals']:>6}   {r2}   {r['within_5cm']:.0%}")
    if a.json:
        a.json.write_text(json.dumps({"image_size": a.image_size, "grid": a.grid, "cameras": list(cameras),
                                      "rows": rows}, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
