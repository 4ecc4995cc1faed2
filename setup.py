from setuptools import find_packages, setup

setup(
    name="vla_ds",
    version="0.1.0",
    description="DeepSpeed training of Vision-Language-Action robot policies (Qwen2.5-VL + sensor encoder + diffusion action expert)",
    packages=find_packages(include=["vla_ds", "vla_ds.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned-but-required: install the build for your machine first
    # (CPU: pip install torch==2.13.0; GPU: the CUDA wheel), then `pip install -e .[dev]`.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "numpy>=1.24",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "ninja",            # DeepSpeed JIT-builds its fused Adam / CPU Adam ops with it, on CPU and GPU boxes
        "wandb>=0.17",      # the guide's monitoring, through DeepSpeed's "wandb" monitor config
        "pyarrow>=14",      # LeRobot datasets: per-frame parquet tables
        "av>=12",           # LeRobot datasets: MP4 video (PyAV bundles FFmpeg: AV1 via dav1d, H.264, HEVC)
        "websockets>=13",   # the policy server and client (openpi's websocket protocol)
        "msgpack>=1.0",     # their messages
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3"],  # the suite runs on two workers (pytest.ini)
        "monitor": ["tensorboard"],
        # Closed-loop evaluation (vla_ds.sim): Meta-World 3.1 and its MuJoCo / gymnasium; headless
        # rendering also needs EGL or OSMesa from the system (docs/sim.md).
        "sim": ["metaworld>=3.1", "gymnasium>=1.0", "mujoco>=3.1", "packaging"],
    },
    entry_points={
        "console_scripts": [
            "vla-train=vla_ds.training.train:main",
            "vla-build-cache=vla_ds.training.train:build_cache_main",
            "vla-convert=vla_ds.policy_tools.convert:main",
            "vla-evaluate=vla_ds.policy_tools.evaluate:main",
            "vla-predict=vla_ds.policy_tools.predict:main",
            "vla-estimate-memory=vla_ds.planning.estimate_memory:main",
            "vla-make-demo-dataset=vla_ds.data.demo:main",
            "vla-make-tiny-backbone=vla_ds.models.tiny_backbone:main",
            "vla-serve=vla_ds.serving.cli:main",
            "vla-eval-sim=vla_ds.sim.cli:eval_main",
            "vla-record-sim=vla_ds.sim.cli:record_main",
        ]
    },
)
