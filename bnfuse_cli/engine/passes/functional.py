"""The functional batch-norm pass: an ``F.batch_norm`` call in a module's own forward, in eval form
(``training=False``) with statistics and affine parameters the module holds, on the output of a
Conv/Linear that nothing else reads, folds into that layer backward, and the call leaves the
module's forward (the module becomes a ``torch.fx.GraphModule`` of its forward without it, as
torch.jit.freeze would remove it).  Every other functional call is listed with its reason, so every
batch-norm call of a forward pass is accounted for.

Guards (each tripped by a test in tests/test_guards.py and tests/test_functional_bn.py; each broken by a
mutant in scripts/mutants.py):
  - a call with batch statistics (``training=True``)
  - running statistics, weight or bias computed in the forward rather than held by a module
  - an input that is not a Conv/Linear output
  - a Linear's output of more than 2 dimensions (the call normalises axis 1, not its features)
  - the layer's output also read elsewhere, or returned or kept
  - the layer called more than once
  - a layer the fold pass would refuse (:func:`bnfuse_cli.engine.guards.producer_problem`)
  - a calling block with hooks (its forward is rewritten: a GraphModule in its place would not run them)
  - a call in the model's own forward, or in a forward torch.fx cannot trace
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..affine import affine_from_stats
from ..forward import held, rewrite_forward, trace_block
from ..guards import hooks, producer_problem
from ..patterns import producer_rule, std_conv_rule
from ..plan import Plan
from ..record import pretty_op, where
from ..steps import RunLayer, SiteSpec, Stats
from .base import AffineFold, by_block, layer_axis

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..record import BatchNormCall, Recorder

__all__ = ["FUNCTIONAL", "FunctionalFold", "FunctionalLeft"]


@dataclass(frozen=True)
class FunctionalFold:
    """The ``index``-th functional batch-norm call in ``block``'s forward, on ``producer``'s output."""

    block: str
    producer: str
    #: qualified names of running_mean, running_var, weight and bias ("" where not given)
    stats: "tuple[str, str, str, str]"
    eps: float

    @property
    def label(self) -> str:
        return f"F.batch_norm in {self.block or 'the model'}"


@dataclass(frozen=True)
class FunctionalLeft:
    where: str
    reason: str


def _refusal(call: "BatchNormCall", rec: "Recorder", escapes: "dict[int, str]") -> "str | None":
    """Why this call cannot fold (None: it can)."""
    if call.training:
        return "it normalises with batch statistics (training=True), so it is not a fixed affine map"
    mean, var, weight, bias = call.stats
    if not mean or not var:
        return ("its running statistics are not tensors a module holds" if mean == "" or var == "" else
                "it is given no running statistics")
    if weight == "" or bias == "":
        return "its weight or bias is computed in the forward, not held by a module"
    prod = rec.produced.get(id(call.input)) if call.input is not None else None
    if prod is None or producer_rule(prod.module)[0] is None:
        return "its input is not the output of a Conv/Linear layer bnfuse folds into"
    if producer_rule(prod.module)[0].kind == "linear" and len(call.input.shape) != 2:
        return f"{prod.name}'s output is {len(call.input.shape)}-D: the call normalises axis 1, not its features"
    others = [(r, op) for r, op in rec.reads.get(id(call.input), []) if op != pretty_op("batch_norm")]
    if others or len(rec.reads.get(id(call.input), [])) != 1:
        r, op = others[0] if others else (None, "a second batch norm")
        return f"the output of {prod.name} is also read by {op} in {where(r)}"
    if id(call.input) in escapes:
        return f"the output of {prod.name} is also {escapes[id(call.input)]}"
    if len(rec.calls.get(id(prod.module), [])) != 1:
        return f"{prod.name} is called more than once"
    problem = producer_problem(prod.module, rec)
    if problem:
        return problem
    if call.caller is not None:  # its forward is rewritten
        return hooks(call.caller.module, call.caller.name, rec)
    return None


class FunctionalPass(AffineFold, name="functional", key="functional_folds", left_key="functional_left",
                     item=FunctionalFold):
    verb = "folded from F.batch_norm calls"
    absorbs = ("label",)
    title, columns = "Functional batch norms folded", ("call", "into")
    left_title, left_what = "Functional batch norms left", "call"

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: Plan) -> None:
        for call in rec.batch_norms:
            if call.caller is not None and std_conv_rule(call.caller.module) is not None:
                continue  # a weight standardisation: the standardise pass accounts for it
            block = call.caller.name if call.caller is not None else ""
            label = f"F.batch_norm in {block or 'the model'}"
            plan.norms.append(label)
            why = _refusal(call, rec, escapes)
            if why is None and not block:
                why = "it is called in the model's own forward (bnfuse rewrites the module that makes the call)"
            if why is None:
                try:
                    trace_block(model.get_submodule(block))
                except Exception as exc:  # noqa: BLE001 - a forward fx cannot follow: the call stays
                    why = f"the forward of {block} cannot be traced by torch.fx ({type(exc).__name__})"
            if why is not None:
                plan.left_by(self.name).append(FunctionalLeft(label, why))
                continue
            prod = rec.produced[id(call.input)]
            plan.of(self.name).append(FunctionalFold(block, prod.name, tuple(s or "" for s in call.stats), call.eps))

    def affine(self, model: "nn.Module", it: FunctionalFold) -> "tuple[torch.Tensor, torch.Tensor]":
        stats = [held(model, q) for q in it.stats]
        return affine_from_stats(stats[0], stats[1], stats[2], stats[3], it.eps, name=it.label)

    def remove(self, model: "nn.Module", items: "list[FunctionalFold]", values: bool) -> None:
        _remove_calls(model, items)

    def sites(self, model: "nn.Module", items: "list[FunctionalFold]") -> "list[SiteSpec]":
        return [SiteSpec(self.name, it.producer, it.producer, (it.label,),
                         (RunLayer(it.producer), Stats(*it.stats, eps=it.eps, axis=layer_axis(model, it.producer))),
                         (RunLayer(it.producer),)) for it in items]

    def row(self, it: FunctionalFold) -> "tuple[str, ...]":
        return it.label, it.producer

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        items, left = plan.of(self.name), plan.left_by(self.name)
        return ("functional batch norms", f"{len(items) + len(left)} found, {len(items)} folded, {len(left)} left") \
            if items or left else None


def _remove_calls(model: "nn.Module", items: "list[FunctionalFold]") -> None:
    """Each block's folded calls taken out of its forward."""
    import torch
    import torch.nn.functional as F
    from torch import fx

    for name, folds in by_block(items):
        def edit(block: "nn.Module", graph: Any, name: str = name, folds: "list[FunctionalFold]" = folds) -> None:
            wanted = {f.producer[len(name) + 1:] if name else f.producer for f in folds}
            done = 0
            for node in list(graph.nodes):
                src = node.args[0] if node.args else None
                if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm) and \
                        isinstance(src, fx.Node) and src.op == "call_module" and str(src.target) in wanted:
                    node.replace_all_uses_with(src)
                    graph.erase_node(node)
                    done += 1
            if done != len(folds):
                raise BnfuseError(f"found {done} of the {len(folds)} folded batch-norm calls in the forward of {name}")

        rewrite_forward(model, name, edit)


FUNCTIONAL = FunctionalPass()
