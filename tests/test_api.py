"""The public surface: what `import anchor_lens` gives, and annotations that resolve."""

import dataclasses
import importlib
import pkgutil
import subprocess
import sys
import typing

import anchor_lens as al

MODULES = [
    importlib.import_module(f"anchor_lens.{m.name}")
    for m in pkgutil.iter_modules(al.__path__)
    if m.name not in ("__main__",)
]


def test_submodules_are_reachable_from_the_package():
    # A fresh interpreter, so no earlier test has imported the submodules already.
    code = "import anchor_lens as al; al.hooks.block_attention_hooks; al.metrics.cumulative_r; "
    code += "al.analysis.information_flow; al.episodes.sample_episode; al.target_logits"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_exists():
    for name in al.__all__:
        assert hasattr(al, name), name
    for module in MODULES:
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_annotations_of_every_dataclass_and_function_resolve():
    """`typing.get_type_hints` fails on a shape string that is not one (e.g. Int[Tensor, batch])."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    # Names that modules import only under TYPE_CHECKING (plotting's result types).
    names = {"Axes": Axes, "Figure": Figure}
    for module in MODULES:
        names.update({n: getattr(module, n) for n in getattr(module, "__all__", [])})
    checked = 0
    for module in MODULES:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if dataclasses.is_dataclass(obj) or callable(obj):
                try:
                    typing.get_type_hints(obj, localns=names)
                except TypeError:  # builtins and typing aliases have no hints to resolve
                    continue
                checked += 1
    assert checked > 50


def test_hook_names_are_transformer_lens_names():
    from transformer_lens.utilities import get_act_name

    assert al.hooks.pattern_hook_name(3) == get_act_name("pattern", 3)
    assert al.hooks.scores_hook_name(0) == "blocks.0.attn.hook_attn_scores"
