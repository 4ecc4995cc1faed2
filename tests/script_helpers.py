"""The command-line scripts (scripts/, benchmarks/) are not part of the package: tests load
them from their files."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
    """The module at ``REPO / relative_path``, e.g. ``load_script("scripts/fault_drill.py")``."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
