"""A batch leaves a DataLoader worker in one piece (WorkerBatch) and arrives unchanged."""

from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions, as the DataLoader does)

from vla_ds.data import DataConfig, VLADataset
from vla_ds.data.loading import PIPE_BYTES, PolicyCollator, WorkerBatch
from vla_ds.models.backbone import BackboneConfig, VLInputBuilder


def mixed_batch(rows: int) -> dict:
    g = torch.Generator().manual_seed(rows)
    return {
        "sensor_window": torch.randn(rows, 32, 16, generator=g),
        "has_sensor": torch.rand(rows, generator=g) > 0.5,
        "episode_index": torch.randint(0, 1 << 40, (rows,), generator=g),
        "frame_time": torch.rand(rows, generator=g, dtype=torch.float64),
        "pixel_values": torch.randn(rows * 4, 1176, generator=g).t(),  # not contiguous
        "empty": torch.zeros(rows, 0),
        "scalar": torch.tensor(3.5),
        "bad_sample": ["a.png: cannot decode"],
        "sample_index": list(range(rows)),
    }


@pytest.mark.parametrize("rows", [2, 128])  # ~0.1 MB through the pipe; ~3 MB through shared memory
def test_packed_batch_round_trips_through_one_buffer(rows):
    batch = mixed_batch(rows)
    tensors_bytes = sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
    assert (tensors_bytes > PIPE_BYTES) == (rows == 128)
    got = ForkingPickler.loads(bytes(ForkingPickler.dumps(WorkerBatch(batch))))
    assert type(got) is dict and got.keys() == batch.keys()
    for key, want in batch.items():
        if isinstance(want, torch.Tensor):
            assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
            assert torch.equal(got[key], want), key
        else:
            assert got[key] == want
    storages = {v.untyped_storage().data_ptr() for v in got.values() if isinstance(v, torch.Tensor) and v.numel()}
    assert len(storages) == 1  # one buffer, not a shared-memory segment per tensor
    if rows == 128:
        assert got["sensor_window"].untyped_storage().is_shared()
    # A plain dict of the same tensors arrives in as many pieces as it has tensors.
    plain = ForkingPickler.loads(bytes(ForkingPickler.dumps(dict(batch))))
    assert len({v.untyped_storage().data_ptr() for v in plain.values()
                if isinstance(v, torch.Tensor) and v.numel()}) > 1


def test_worker_batches_equal_in_process_batches(tiny_backbone_dir, demo_dataset_dir):
    ds = VLADataset.from_config(DataConfig(dataset_dir=str(demo_dataset_dir), sensor_window_size=32))
    collate = PolicyCollator(VLInputBuilder.from_pretrained(BackboneConfig(model_name_or_path=str(tiny_backbone_dir))))
    indices = list(range(0, len(ds), max(1, len(ds) // 24)))[:24]
    batches = {}
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=indices, collate_fn=collate, num_workers=workers)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[1]) == 3
    for a, b in zip(batches[0], batches[1]):
        assert a.keys() == b.keys() and {"pixel_values", "input_ids", "sensor_window"} <= set(a)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_copies_never_pack_and_the_main_process_gets_plain_dicts(tiny_backbone_dir, demo_dataset_dir):
    """pin_memory copies each batch with copy.copy: that must stay a shallow copy, not a trip
    through the packing; and with 0 workers the collator's batch is a plain dict."""
    import copy

    batch = WorkerBatch(mixed_batch(128))  # large: packing would allocate shared memory
    shallow = copy.copy(batch)
    assert shallow["sensor_window"] is batch["sensor_window"]
    deep = copy.deepcopy(batch)
    assert deep["sensor_window"] is not batch["sensor_window"]
    assert not deep["sensor_window"].untyped_storage().is_shared()
    assert torch.equal(deep["sensor_window"], batch["sensor_window"])
    ds = VLADataset.from_config(DataConfig(dataset_dir=str(demo_dataset_dir), sensor_window_size=32))
    collate = PolicyCollator(VLInputBuilder.from_pretrained(BackboneConfig(model_name_or_path=str(tiny_backbone_dir))))
    assert type(collate([ds[0], ds[1]])) is dict
