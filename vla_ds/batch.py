"""The sample and the micro batch: the one place their keys and shapes are written.

A sample (``VLADataset.__getitem__``) holds the keys below; the collator
(``vla_ds.data.loading.PolicyCollator``) stacks them into a micro batch (shapes after the
arrows; B samples, V views, W window rows, C sensor channels, H action steps) and turns
``IMAGES`` + ``INSTRUCTION`` into the backbone's ``VL_INPUT_KEYS`` or, for samples from the
Stage 1 feature cache, stacks ``VL_HIDDEN``. ``VLAPolicy`` reads the batch by these names.
"""

from __future__ import annotations

import torch

IMAGES = "images"                  # list of V uint8 (h, w, 3) arrays, camera_views order -> list of B lists
INSTRUCTION = "instruction"        # str -> list of B str
SENSOR_WINDOW = "sensor_window"    # float32 (W, C) raw values, zeros without sensor -> (B, W, C)
SENSOR_PAD = "sensor_pad"          # int, the window's first rows that are front padding (W without sensor) -> int64 (B,)
HAS_SENSOR = "has_sensor"          # bool -> bool (B,)
ACTIONS = "actions"                # float32 (H, D) raw actions (D = 7 delta pose, or a LeRobot action's own) -> (B, H, D)
ACTION_IS_PAD = "action_is_pad"    # bool (H,), True past the episode end -> bool (B, H)
CONFIDENCE = "confidence"          # float, loss weight from metadata.json -> float32 (B,)
EPISODE_INDEX = "episode_index"    # int, Episode.index -> int64 (B,)
FRAME_TIME = "frame_time"          # float seconds, t -> float64 (B,)

# The backbone's inputs, built by the collator from IMAGES + INSTRUCTION (VLInputBuilder).
INPUT_IDS = "input_ids"            # int64 (B, L) prompt tokens, image pads included, right-padded
ATTENTION_MASK = "attention_mask"  # int64 (B, L)
PIXEL_VALUES = "pixel_values"      # float32 (sum of patches over B x V, 1176) flattened image patches
IMAGE_GRID_THW = "image_grid_thw"  # int64 (B x V, 3) patch grid of each image
VL_INPUT_KEYS = (INPUT_IDS, ATTENTION_MASK, PIXEL_VALUES, IMAGE_GRID_THW)
VL_HIDDEN = "vl_hidden"            # float32 VL features from the Stage 1 cache: (hidden,) pooled -> (B, hidden),
                                   # or (T, hidden) tokens -> (B, T, hidden)

# Loading bookkeeping (vla_ds.data.loading), removed before the batch reaches the model.
BAD_SAMPLE = "bad_sample"          # str: "<file>: <problem>" for a sample that could not be loaded
SAMPLE_INDEX = "sample_index"      # int: the sample's index in the wrapped dataset -> list of B ints


def random_batch(batch_size: int, window: int, channels: int, horizon: int, hidden: int | None = None,
                 action_dim: int = 7, generator: torch.Generator | None = None,
                 vl_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """A micro batch of random values with the training batch's numeric keys and shapes (and
    ``VL_HIDDEN`` features when ``hidden`` is given: (B, hidden), or (B, vl_tokens, hidden)
    for the tokens conditioning): synthetic batches for benchmarks and tests."""
    batch = {SENSOR_WINDOW: torch.randn(batch_size, window, channels, generator=generator),
             HAS_SENSOR: torch.ones(batch_size, dtype=torch.bool),
             ACTIONS: torch.randn(batch_size, horizon, action_dim, generator=generator),
             ACTION_IS_PAD: torch.zeros(batch_size, horizon, dtype=torch.bool),
             CONFIDENCE: torch.ones(batch_size)}
    if hidden is not None:
        shape = (batch_size, hidden) if vl_tokens is None else (batch_size, vl_tokens, hidden)
        batch = {VL_HIDDEN: torch.randn(*shape, generator=generator), **batch}
    return batch
