"""The functional batch-norm pass: an ``F.batch_norm`` call in a module's own forward (the model's
own included), in eval form (``training=False``) with statistics and affine parameters the model
holds (parameters, buffers, or plain tensor attributes of a module: ``self.running_mean =
torch.zeros(c)``), on the output of a Conv/Linear that nothing else reads, folds into that layer
backward, and the call leaves the module's forward (the module becomes a ``torch.fx.GraphModule`` of
its forward without it, as torch.jit.freeze would remove it).  Every other functional call is listed
with its reason, so every batch-norm call of a forward pass is accounted for.

Guards (each tripped by a test in tests/test_guards.py and tests/test_functional_bn.py; each broken by a
mutant in scripts/mutants.py):
  - a call with batch statistics (``training=True``)
  - running statistics, weight or bias the model does not hold (a global, a closure, a value computed
    in the forward): the reason names which
  - an input that is not a Conv/Linear output
  - a Linear's output of more than 2 dimensions (the call normalises axis 1, not its features)
  - the layer's output also read elsewhere, or returned or kept
  - the layer called more than once
  - a layer the fold pass would refuse (:func:`bnfuse_cli.engine.guards.producer_problem`)
  - a calling block with hooks (its forward is rewritten: a GraphModule in its place would not run them)
  - a call in a forward torch.fx cannot trace, or on a BatchNorm module's own statistics
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import BnfuseError
from ..affine import affine_from_stats
from ..forward import child_name, held, rewrite_forward, trace_block
from ..guards import hooks, producer_problem
from ..patterns import is_norm_like, producer_rule, std_conv_rule
from ..plan import Plan
from ..record import pretty_op, where
from ..steps import Forward, RunLayer, SiteSpec
from .base import OMIT_EMPTY, AffineFold, by_block

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..record import BatchNormCall, Recorder

__all__ = ["FUNCTIONAL", "FunctionalFold", "FunctionalLeft"]


@dataclass(frozen=True)
class FunctionalFold:
    """The ``index``-th functional batch-norm call (from 0) in ``block``'s forward, on ``producer``'s output."""

    block: str
    producer: str
    #: qualified names of running_mean, running_var, weight and bias ("" where not given): parameters,
    #: buffers or plain tensor attributes of a module
    stats: "tuple[str, str, str, str]"
    eps: float
    index: int = field(default=0, metadata=OMIT_EMPTY)

    @property
    def label(self) -> str:
        return _label(self.block, self.index)


def _label(block: str, index: int) -> str:
    """How reports name a call: ``F.batch_norm in layer1``, ``F.batch_norm #2 in layer1`` for the second."""
    return f"F.batch_norm{f' #{index + 1}' if index else ''} in {block or 'the model'}"


@dataclass(frozen=True)
class FunctionalLeft:
    where: str
    reason: str


def _refusal(call: "BatchNormCall", rec: "Recorder", escapes: "dict[int, str]") -> "str | None":
    """Why this call cannot fold (None: it can)."""
    if call.training:
        return "it normalises with batch statistics (training=True), so it is not a fixed affine map"
    if call.unresolved:  # (no running statistics at all: torch refuses the call in eval form)
        return (f"its {'; its '.join(call.unresolved)}: bnfuse folds only tensors the model holds (a parameter, "
                "a buffer or a tensor attribute of a module), which it reads by name")
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
        made: dict[str, int] = {}
        for call in rec.batch_norms:
            if call.caller is not None and std_conv_rule(call.caller.module) is not None:
                continue  # a weight standardisation: the standardise pass accounts for it
            block = call.caller.name if call.caller is not None else ""
            index = made[block] = made.get(block, -1) + 1
            label = _label(block, index)
            plan.norms.append(label)
            why = _refusal(call, rec, escapes) or _borrowed(model, call)
            if why is None:
                why = _located(model, block, rec.produced[id(call.input)].name)
            if why is not None:
                plan.left_by(self.name).append(FunctionalLeft(label, why))
                continue
            prod = rec.produced[id(call.input)]
            plan.of(self.name).append(FunctionalFold(block, prod.name, tuple(s or "" for s in call.stats), call.eps,
                                                     index))

    def affine(self, model: "nn.Module", it: FunctionalFold) -> "tuple[torch.Tensor, torch.Tensor]":
        stats = [held(model, q) for q in it.stats]
        return affine_from_stats(stats[0], stats[1], stats[2], stats[3], it.eps, name=it.label)

    def remove(self, model: "nn.Module", items: "list[FunctionalFold]", values: bool) -> "nn.Module":
        return _remove_calls(model, items)

    def sites(self, model: "nn.Module", items: "list[FunctionalFold]") -> "list[SiteSpec]":
        """The layer, then the call as the block's own forward makes it (the judge replays the model's
        code, not the statistics this pass read)."""
        return [SiteSpec(self.name, it.producer, it.producer, (it.label,),
                         (RunLayer(it.producer), Forward(it.block, *_ends(model, it))), (RunLayer(it.producer),))
                for it in items]

    def row(self, it: FunctionalFold) -> "tuple[str, ...]":
        return it.label, it.producer

    def summary(self, plan: Plan) -> "tuple[str, str] | None":
        items, left = plan.of(self.name), plan.left_by(self.name)
        return ("functional batch norms", f"{len(items) + len(left)} found, {len(items)} folded, {len(left)} left") \
            if items or left else None


def _calls(graph: Any, block: str, producer: str) -> "list[tuple[Any, Any]]":
    """The (layer call, batch-norm call) node pairs of ``block``'s traced forward in which a batch-norm
    call reads the output of its child call of ``producer``."""
    import torch
    import torch.nn.functional as F
    from torch import fx

    out = []
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm) and \
                isinstance(src, fx.Node) and src.op == "call_module" and child_name(block, src.target) == producer:
            out.append((src, node))
    return out


def _borrowed(model: "nn.Module", call: "BatchNormCall") -> "str | None":
    """Why a call on the statistics of a BatchNorm module stays: that module stays too (the fold pass
    names this call as what reads it), and the report must not say it stays while it is gone."""
    for q in call.stats:
        owner = q.rpartition(".")[0] if q else None
        if owner and is_norm_like(model.get_submodule(owner)):
            return f"it reads the statistics of the BatchNorm {owner}, which stays in the model"
    return None


def _located(model: "nn.Module", block: str, producer: str) -> "str | None":
    """Why the call cannot be taken out of ``block``'s forward: the forward cannot be traced, or the call
    is not found there reading its child call of ``producer``; None when it can."""
    where = block or "the model"
    try:
        graph = trace_block(model.get_submodule(block))
    except Exception as exc:  # noqa: BLE001 - a forward fx cannot follow: the call stays
        return f"the forward of {where} cannot be traced by torch.fx ({type(exc).__name__})"
    if len(_calls(graph, block, producer)) != 1:
        return f"the forward of {where} does not make it on the output of its own call of {producer}"
    return None


def _ends(model: "nn.Module", it: FunctionalFold) -> "tuple[str, str]":
    """The fx nodes of the layer's call and of the batch-norm call in the block's forward ("" where not found)."""
    try:
        found = _calls(trace_block(model.get_submodule(it.block)), it.block, it.producer)
    except Exception:  # noqa: BLE001 - not traced: the judge cannot replay the site, and says so
        found = []
    return (found[0][0].name, found[0][1].name) if len(found) == 1 else ("", "")


def _remove_calls(model: "nn.Module", items: "list[FunctionalFold]") -> "nn.Module":
    """Each block's folded calls taken out of its forward; the model, a new root when a call was in the
    model's own forward."""
    for name, folds in by_block(items):
        def edit(block: "nn.Module", graph: Any, name: str = name, folds: "list[FunctionalFold]" = folds) -> None:
            found = [pair for f in folds for pair in _calls(graph, name, f.producer)]
            if len(found) != len(folds):
                raise BnfuseError(f"found {len(found)} of the {len(folds)} folded batch-norm calls in the forward "
                                  f"of {name or 'the model'}")
            for src, node in found:
                node.replace_all_uses_with(src)
                graph.erase_node(node)

        model = rewrite_forward(model, name, edit)
    return model


FUNCTIONAL = FunctionalPass()
