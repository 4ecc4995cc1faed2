"""FLOPs of one sample through the policy, from its architecture: what the throughput
benchmarks (``benchmarks/gpu_stage2.py``'s MFU, ``benchmarks/bench_cache.py``'s ceiling) divide
by. ``tests/test_memory.py`` checks the backbone count against torch's FLOP counter."""

from __future__ import annotations


def backbone_forward_flops(hf_config, lm_tokens: int, patches_per_view: int, views: int) -> dict[str, int]:
    """Forward FLOPs of one sample through a Qwen2.5-VL, from its architecture.

    Matmuls: 2 x the weights each token touches (``lm``: every decoder layer; ``vision``:
    patch embedding and every vision block; ``merger``: the patch merger). Attention
    scores and values: 4 x hidden x the keys each query sees (``lm_attention``: the whole
    sequence; ``vision_attention``: 112-px windows of 64 patches, the whole view in the
    full-attention layers). The LM head is not counted (the policy never runs it)."""
    text, vision = hf_config.text_config, hf_config.vision_config
    h, inter = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q, kv = head_dim * text.num_attention_heads, head_dim * text.num_key_value_heads
    lm_layer = 2 * h * q + 2 * h * kv + 3 * h * inter  # q and o, k and v, gate/up/down
    vh, vinter = vision.hidden_size, vision.intermediate_size
    vis_layer = 4 * vh * vh + 3 * vh * vinter  # qkv and proj, gate/up/down
    patches = views * patches_per_view
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    full = len(getattr(vision, "fullatt_block_indexes", []) or [])
    window = min((vision.window_size // vision.patch_size) ** 2, patches_per_view)
    merge = vh * vision.spatial_merge_size ** 2
    return {
        "lm": 2 * text.num_hidden_layers * lm_layer * lm_tokens,
        "lm_attention": 2 * text.num_hidden_layers * 2 * lm_tokens * lm_tokens * q,
        "vision": 2 * patch_dim * vh * patches + 2 * vision.depth * vis_layer * patches,
        "vision_attention": 2 * 2 * vh * patches * ((vision.depth - full) * window + full * patches_per_view),
        "merger": 2 * (patches // vision.spatial_merge_size ** 2) * (merge * merge + merge * vision.out_hidden_size),
    }


def heads_forward_flops(sensor_encoder, action_expert, horizon: int) -> int:
    """Forward FLOPs of one sample through the sensor encoder and action expert modules:
    2 x parameters x the tokens each sees (the sensor encoder's downsampled sequence; the
    action expert's horizon + its conditioning tokens: the VL tokens, sensor and timestep)."""
    se_tokens = sensor_encoder.config.downsampled_length
    se = 2 * sum(p.numel() for p in sensor_encoder.parameters()) * se_tokens
    ae = 2 * sum(p.numel() for p in action_expert.parameters()) * (horizon + action_expert.config.num_vl_tokens + 2)
    return se + ae
