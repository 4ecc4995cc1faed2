"""Planning a run before it starts: per-GPU memory (``memory``, ``estimate_memory``) and
FLOPs (``flops``) of the reference model, built on the meta device."""
