"""Helpers that write tiny episodes in the SPEC section 3 format into a test's tmp_path.

Images are 4x3 PNGs whose red channel is the frame's index in its view and whose
green channel is the view's index, so a test can tell exactly which frame a sample
picked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

POSE_HEADER = ["timestamp", "pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r"]


def write_csv(path: Path, header: list[str], rows) -> Path:
    """Write a CSV with a header row; rows are sequences of values written with repr-like precision."""
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join(v if isinstance(v, str) else repr(float(v)) for v in row))
    path.write_text("\n".join(lines) + "\n")
    return path


def frame_image(frame_index: int, view_index: int) -> np.ndarray:
    """(3, 4, 3) uint8 image identifying a frame: red = frame index, green = view index."""
    img = np.zeros((3, 4, 3), dtype=np.uint8)
    img[..., 0] = frame_index
    img[..., 1] = view_index
    return img


def write_episode(ep_dir: Path, *, state_times=None, poses=None, gripper=None, extra_columns: dict | None = None,
                  frame_times: dict[str, list[float]] | None = None, metadata: dict | None = None,
                  sensor: tuple[np.ndarray, np.ndarray] | None = None, compressed: bool = False,
                  suffix: str = ".png") -> Path:
    """Write one episode.

    Defaults: robot states at 10 Hz over t in [0, 3] s with pose = (t, 2t, 3t, 0, 0, 0)
    (x in mm: dx per 0.1 s step = 0.1), views ``front`` and ``wrist`` with frames at
    0.0, 0.1, ..., 2.0 s (wrist 0.02 s later), metadata ``{}``. ``sensor`` is
    (timestamps, data) written as sensor_data.npz (``np.savez`` or, with
    ``compressed``, ``np.savez_compressed``).
    """
    ep_dir = Path(ep_dir)
    ep_dir.mkdir(parents=True, exist_ok=True)
    if state_times is None:
        state_times = np.round(np.arange(0, 31) * 0.1, 6)
    state_times = np.asarray(state_times, dtype=np.float64)
    if poses is None:
        poses = np.stack([state_times, 2 * state_times, 3 * state_times] + [np.zeros_like(state_times)] * 3, 1)
    poses = np.asarray(poses, dtype=np.float64)
    header = list(POSE_HEADER)
    columns = [state_times[:, None], poses]
    if gripper is not None:
        header.append("gripper")
        columns.append(np.asarray(gripper, dtype=np.float64)[:, None])
    for name, values in (extra_columns or {}).items():
        header.append(name)
        columns.append(np.asarray(values, dtype=np.float64)[:, None])
    write_csv(ep_dir / "robot_states.csv", header, np.concatenate(columns, axis=1))

    if frame_times is None:
        base = np.round(np.arange(21) * 0.1, 6)
        frame_times = {"front": list(base), "wrist": list(base + 0.02)}
    for v, (view, times) in enumerate(frame_times.items()):
        view_dir = ep_dir / "images" / view
        view_dir.mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(times):
            Image.fromarray(frame_image(k, v)).save(view_dir / f"{t:.6f}{suffix}")

    (ep_dir / "metadata.json").write_text(json.dumps(metadata or {}))
    if sensor is not None:
        save = np.savez_compressed if compressed else np.savez
        save(ep_dir / "sensor_data.npz", timestamps=np.asarray(sensor[0]), data=np.asarray(sensor[1]))
    return ep_dir


def write_mixture(root: Path, sources: list[tuple[str, float]]) -> Path:
    """Write root/mixture.yaml listing (path, weight) sources."""
    lines = ["sources:"] + [f"  - path: {p}\n    weight: {w}" for p, w in sources]
    path = Path(root) / "mixture.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def corrupt_compressed_member(path: Path, member: str, start_fraction: float = 0.5) -> Path:
    """Damage ``member`` of a ``np.savez_compressed`` file in place so that inflating it
    raises ``zlib.error`` (not merely a CRC mismatch); the zip directory stays intact.

    Bytes are flipped from ``start_fraction`` of the member's compressed stream onward
    (0.5: the start of the stream, holding the .npy header, still decodes).
    """
    import zipfile
    import zlib

    path = Path(path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    assert info.compress_type == zipfile.ZIP_DEFLATED, f"{member} is not compressed"
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    stream = bytes(raw[start:start + info.compress_size])
    for offset in range(int(len(stream) * start_fraction), len(stream) - 16, 7):
        damaged = bytearray(stream)
        damaged[offset:offset + 16] = bytes(b ^ 0xA5 for b in damaged[offset:offset + 16])
        try:
            zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(damaged))
        except zlib.error:
            raw[start:start + info.compress_size] = damaged
            path.write_bytes(bytes(raw))
            return path
    raise AssertionError(f"could not make {member} of {path} fail to inflate")
