#!/usr/bin/env bash
# Stage 1 on the embedded default, on CPU, with no downloads:
#   1. a tiny random-weight Qwen2.5-VL (same from_pretrained path as the real 3B model),
#   2. the generated demo dataset (two sources, two camera views, a sensor stream),
#   3. Stage 1 training through the DeepSpeed launcher with 2 ranks,
#   4. the training loss at the start and at the end,
#   5. the checkpoint exported as a policy and evaluated open-loop on the validation episodes.
# usage: bash scripts/demo.sh [OUT_DIR]   (default: demo/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo}"
PORT="${MASTER_PORT:-29533}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

python scripts/make_tiny_backbone.py "$OUT/tiny_backbone"
python scripts/make_demo_dataset.py "$OUT/dataset" --episodes 10 --overwrite
rm -rf "$OUT/stage1"
deepspeed --num_gpus 2 --master_port "$PORT" scripts/train.py \
    --ds_config ds_configs/stage1.json \
    --dataset_dir "$OUT/dataset" \
    --vl-model "$OUT/tiny_backbone" \
    --model-preset tiny \
    --sensor-window-size 32 \
    --batch_size 8 --grad_accum 1 --lr 1e-3 --epochs 30 \
    --num_workers 0 \
    --output_dir "$OUT/stage1"
python scripts/summarize_run.py "$OUT/stage1"
rm -rf "$OUT/policy" "$OUT/eval"
python scripts/convert_checkpoint.py "$OUT/stage1" "$OUT/policy" --to policy
python scripts/evaluate.py --policy "$OUT/policy" --dataset_dir "$OUT/dataset" --output "$OUT/eval" --no-progress
echo "report: $OUT/eval/report.json   plots: $OUT/eval/plots/"
