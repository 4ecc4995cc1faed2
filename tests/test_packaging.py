"""The installed console entry points resolve to callables."""

from importlib.metadata import entry_points


def test_console_scripts_load():
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.value.startswith("vla_ds.")]
    assert {ep.name for ep in scripts} >= {"vla-train", "vla-build-cache", "vla-convert", "vla-evaluate",
                                           "vla-make-demo-dataset", "vla-make-tiny-backbone", "vla-predict",
                                           "vla-estimate-memory"}
    for ep in scripts:
        assert callable(ep.load()), ep.name
