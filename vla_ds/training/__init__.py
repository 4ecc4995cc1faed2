"""A training run: its configuration, the DeepSpeed engine and process group, the loop,
checkpoints, the Stage 1 feature cache, launch checks, EMA, metrics, the ``train`` entry
point and the fault drill. Built on ``vla_ds.data`` and ``vla_ds.models``; nothing below
this package imports it."""
