"""Dataset layer: episodes on disk (SPEC section 3, or LeRobot v2.1/v3.0 datasets) -> samples -> batches.

``VLADataset.from_config`` finds and validates every episode (``lerobot.py`` reads LeRobot roots), ``split_train_val``
splits by episode, ``DistributedWeightedSampler`` orders each epoch, and
``collate_numeric`` stacks samples into tensors. See docs/dataset_format.md.
"""

from vla_ds.data.dataset import (
    ACTION_DIM,
    DataConfig,
    VLADataset,
    collate_numeric,
    compute_action_chunk,
    load_episodes,
    read_mixture,
    scan_dataset,
    split_train_val,
    wrap_degrees,
)
from vla_ds.data.demo import make_demo_dataset
from vla_ds.data.episodes import Episode, SensorData, find_episode_dirs, load_episode
from vla_ds.data.lerobot import LeRobotConfig, LeRobotEpisode, load_lerobot_episodes
from vla_ds.data.normalize import NormStats, compute_norm_stats
from vla_ds.data.sampler import DistributedWeightedSampler

__all__ = [
    "ACTION_DIM",
    "DataConfig", "VLADataset", "collate_numeric", "compute_action_chunk", "load_episodes", "read_mixture", "scan_dataset",
    "split_train_val", "wrap_degrees",
    "make_demo_dataset",
    "Episode", "SensorData", "find_episode_dirs", "load_episode",
    "LeRobotConfig", "LeRobotEpisode", "load_lerobot_episodes",
    "NormStats", "compute_norm_stats",
    "DistributedWeightedSampler",
]
