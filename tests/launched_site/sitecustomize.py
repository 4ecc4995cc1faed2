"""Start-up hook of the Python processes the tests launch (tests/conftest.py puts this folder
first on their PYTHONPATH): py-cpuinfo asked once per test session, not once per process.

DeepSpeed asks py-cpuinfo for the CPU's architecture and SIMD flags each time a process
JIT-loads one of its C++ ops (fused Adam, the shm comm op) and each time it builds a
DeepSpeedCPUAdam. Every ``get_cpu_info()`` starts a helper process that times the clock
for a second while its parent busy-waits: ~1.2 s of a core per call, ~2.5 s per launched
rank. The answer cannot change during a test session on one machine, so the first process
that asks saves it to ``$VLA_DS_TEST_CPU_INFO`` and every later one (the pytest process,
ranks, launchers, ``python scripts/...``) reads it from there. Nothing else changes: the
ops are still loaded, with the same flags. Without the variable this hook does nothing.
"""

import os
import sys


def _install(path: str) -> None:
    import importlib.abc
    import importlib.util

    class PatchOnImport(importlib.abc.MetaPathFinder):
        """Let the normal finders load ``cpuinfo``, then answer its ``get_cpu_info`` from ``path``."""

        def find_spec(self, fullname, path_=None, target=None):
            if fullname != "cpuinfo":
                return None
            sys.meta_path.remove(self)  # from here on the normal finders only
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                patch_cpuinfo(module, path)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, PatchOnImport())


def patch_cpuinfo(module, path: str):
    """Make ``module.get_cpu_info`` (the ``cpuinfo`` package's, and its submodule's) answer
    from ``path``, asking the real one and saving its answer there if no process did yet.
    Returns the real function."""
    import json

    real = module.get_cpu_info
    saved = {}

    def get_cpu_info():
        if not saved:
            try:
                with open(path) as f:
                    saved.update(json.load(f))
            except (OSError, ValueError):
                saved.update(json.loads(json.dumps(real())))
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(saved, f)
                os.replace(tmp, path)
        return json.loads(json.dumps(saved))  # a fresh dict per call, as the real one gives

    module.get_cpu_info = get_cpu_info
    inner = sys.modules.get(module.__name__ + ".cpuinfo")
    if inner is not None:
        inner.get_cpu_info = get_cpu_info
    return real


def _chain_to_the_next_sitecustomize() -> None:
    """Run the sitecustomize this folder shadows, if there is one, as Python would have."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        candidate = os.path.join(entry or os.curdir, "sitecustomize.py")
        if os.path.isfile(candidate):
            with open(candidate) as f:
                code = compile(f.read(), candidate, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": candidate, "__builtins__": __builtins__})
            return


if __name__ == "sitecustomize":
    if os.environ.get("VLA_DS_TEST_CPU_INFO") and "cpuinfo" not in sys.modules:
        _install(os.environ["VLA_DS_TEST_CPU_INFO"])
    _chain_to_the_next_sitecustomize()
