"""The unwrap pass (``--unwrap``/``--no-unwrap``; by default on where names do not reach the user, for an
exported program and bench's fused side, and off for a state_dict file): a wrapper whose forward, once the other passes are
done, calls one child alone on its input is replaced by that child, so the model calls the layer
itself.  A ``Sequential`` of a conv and its folded BatchNorm (RepViT's 60 ``ConvNorm``, torchvision
ResNet's ``downsample``), a block a merge left calling its merged conv alone (RepViT's
``RepVggDw``): two module calls less each per forward, which is what timm's hand-written
re-parameterisation does.

It renames: the child's parameters lose the wrapper's part of their names (``x.c.weight`` becomes
``x.weight``), and a ``Sequential`` wrapper can no longer be indexed.  That is why a state_dict keeps
its names unless the user asks; ``load`` rebuilds the same names from the fused file's record.  It runs in a round of its
own, after every other pass has finished (they leave the ``nn.Identity`` that makes a wrapper
one call), and each item is judged like any other: the wrapper on the model before against the
child in its place after (in ``verify``: the original wrapper, BatchNorm and all, against it).

Guards (each tripped by a test in tests/test_unwrap.py and tests/test_guards.py; each broken by a mutant
in scripts/mutants.py):
  - a wrapper with hooks: forward, forward pre-, backward (its child would not run them)
  - a wrapper held under more than one name
  - a wrapper whose child the model also calls without it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import BnfuseError
from ..forward import child_name
from ..guards import hooks
from ..plan import Plan
from ..steps import RunModule, SiteSpec
from .base import Option, Pass

if TYPE_CHECKING:
    from torch import nn

    from ..record import Recorder

__all__ = ["UNWRAP", "Unwrap", "UnwrapLeft", "only_child"]


@dataclass(frozen=True)
class Unwrap:
    """The module ``wrapper`` replaced by its child ``child`` (a dotted name inside it); ``layer``: the
    layer that first reads the wrapper's input (the judge's crop is taken there)."""

    wrapper: str
    child: str
    layer: str

    def __post_init__(self) -> None:
        if not self.wrapper or not self.child.startswith(f"{self.wrapper}."):
            raise ValueError(f"unwrap of {self.wrapper!r} to {self.child!r}: not a child of it")


@dataclass(frozen=True)
class UnwrapLeft:
    """A wrapper of one call left in place, and why."""

    wrapper: str
    reason: str


def only_child(module: "nn.Module") -> "str | None":
    """The child ``module``'s forward calls alone on its one input, or None: a ``Sequential`` whose other
    members are ``nn.Identity``, or a rewritten block whose graph is one call of a child."""
    from torch import fx, nn

    if module._parameters or module._buffers:
        return None
    if type(module).forward is nn.Sequential.forward and type(module).__call__ is nn.Module.__call__:
        real = [k for k, c in module._modules.items() if type(c) is not nn.Identity]
        return real[0] if len(real) == 1 else None
    if isinstance(module, fx.GraphModule):
        nodes = list(module.graph.nodes)
        if (len(nodes) == 3 and [n.op for n in nodes] == ["placeholder", "call_module", "output"]
                and nodes[1].args == (nodes[0],) and not nodes[1].kwargs and nodes[2].args == (nodes[1],)):
            return str(nodes[1].target)
    return None


def _calls(module: "nn.Module", rec: "Recorder") -> int:
    return len(rec.calls.get(id(module)) or rec.module_calls.get(id(module)) or [])


def _first_layer(model: "nn.Module", name: str) -> str:
    """The innermost module that reads a wrapper's input first (down through wrappers of one call
    without hooks: a pre-hook may change the input)."""
    module = model.get_submodule(name)
    inner = only_child(module) if hooks(module, name) is None else None
    return _first_layer(model, child_name(name, inner)) if inner is not None else name


class UnwrapPass(Pass, name="unwrap", key="unwraps", left_key="unwrap_left", item=Unwrap):
    verb = "unwrapped"
    option = Option("unwrap", "Replace each wrapper left calling one layer alone (a Sequential of a conv and its "
                              "folded BatchNorm) by that layer: two module calls less each, as timm's own "
                              "re-parameterisation does, but its parameters are renamed (x.c.weight becomes x.weight). "
                              "Default: on for .pt2 and .onnx outputs and bench's fused side, where no name reaches "
                              "you; off for .pth and .safetensors, whose keys stay.", default=None)
    rewrites, absorbs = ("wrapper",), ()
    title, columns = "Unwrapped (a wrapper that calls one layer -> that layer, renamed)", ("layer now at", "was")
    left_title, left_what = "Wrappers left in place", "wrapper"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        if any(items for name, items in plan.items.items() if name != self.name):
            plan.more = True  # a round of its own, once the others have left their wrappers
            return
        counts: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            counts[id(m)] = counts.get(id(m), 0) + 1
        for name, module in model.named_modules():
            rel = only_child(module) if name else None
            if rel is None:
                continue
            child = module.get_submodule(rel)
            why = hooks(module, name) or (
                "it is held under more than one name" if counts[id(module)] > 1 else
                f"the model calls {child_name(name, rel)} without it" if _calls(child, rec) != _calls(module, rec)
                else "")
            if why:
                plan.left_by(self.name).append(UnwrapLeft(name, why))
            else:
                full = child_name(name, rel)
                plan.of(self.name).append(Unwrap(name, full, _first_layer(model, full)))

    def apply(self, model: "nn.Module", items: "list[Unwrap]") -> None:
        # innermost first: an outer wrapper then holds the inner one's child under the inner's name
        for it in sorted(items, key=lambda i: -i.wrapper.count(".")):
            try:
                child = model.get_submodule(it.child)
            except AttributeError as exc:
                raise BnfuseError(f"the fused file unwraps {it.wrapper} to {it.child}, which this model "
                                  "does not have") from exc
            model.set_submodule(it.wrapper, child)

    rebuild = apply

    def sites(self, model: "nn.Module", items: "list[Unwrap]") -> "list[SiteSpec]":
        """The wrapper before against the child in its place after (covering every site inside it: their
        layers have the wrapper's names no more)."""
        return [SiteSpec(self.name, it.wrapper, it.layer, (it.child,), (RunModule(it.wrapper),),
                         (RunModule(it.wrapper),), covers=(it.wrapper,)) for it in items]

    def row(self, it: Unwrap) -> "tuple[str, ...]":
        return it.wrapper, it.child

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        n = len(plan.of(self.name))
        return ("unwrapped", f"{n} wrappers of one call -> the layer they call") if n else None


UNWRAP = UnwrapPass()
