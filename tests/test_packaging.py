"""The installed console entry points resolve to callables."""

from importlib.metadata import entry_points


def test_console_scripts_load():
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.value.startswith("vla_ds.")]
    assert {ep.name for ep in scripts} >= {"vla-train", "vla-make-demo-dataset"}
    for ep in scripts:
        assert callable(ep.load()), ep.name
