"""benchmarks/gpu_stage2.py cannot rot unseen: its CPU smoke mode (tiny backbone and heads, one
step per micro batch) runs the same build -> engine -> micro step path a GPU run takes."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_stage2_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_stage2.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_stage2.py"), "--tiny", "--micro-batches", "2",
                           "--steps", "1", "--warmup", "1", "--workdir", str(tmp_path), "--json", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"stage2", "stage1_cached"}
    assert rows["stage2"]["micro_batch"] == 2 and rows["stage2"]["samples_per_s"] > 0
    assert rows["stage2"]["lm_tokens_per_sample"] > 0 and rows["stage2"]["model_tflops_per_sample"] > 0
    assert rows["stage1_cached"]["samples_per_s"] > 0
