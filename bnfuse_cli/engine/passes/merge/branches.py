"""One branch of a sum, by the recorded data flow: what a leaf of a linear tree computes (a conv or
Linear with its BatchNorm folded, a BatchNorm on the shared input, a module that is its BatchNorm,
or the input itself), or why it is not a branch that merges (:mod:`.find`); and the merge pass's items."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dataclasses import dataclass, field

from ...forward import child_name, passthrough, single_call, trace_block
from ...guards import hooks, norm_problem, producer_problem
from ...patterns import is_norm_like, is_producer_like, norm_rule, producer_rule
from ...sums import linear_trees
from ..base import OMIT_EMPTY

if TYPE_CHECKING:
    from torch import fx, nn

    from ...record import Recorder

__all__ = ["Branch", "Merge", "MergeSkip", "writes_in_place", "branch_of", "flat_pair", "flat_branch", "rule_kind"]


@dataclass(frozen=True)
class Branch:
    """One branch of a sum that merges into one conv: ``conv`` (a conv, its BN folded into it
    first), ``norm`` (a BatchNorm on the shared input) or ``identity`` (the input itself)."""
    # a ``conv`` branch written as two children of the block (``self.bn1(self.conv1(x))``) names
    # its conv as ``module`` and the BatchNorm after it as ``norm``

    kind: str
    #: the module that computes the branch (the block's child), None for ``identity``
    module: "str | None" = None
    #: the BatchNorm the branch absorbs: the BN of a ``norm`` branch, or the separate BN child of a flat
    #: ``conv`` branch (folded into its conv first, as a Fold)
    norm: "str | None" = None
    #: what the sum multiplies the branch by, innermost first: ("mul", a number or a held tensor's
    #: name, one value or one per channel), ("div", a number), ("module", a per-channel scale module)
    scale: "tuple[tuple[str, str | float], ...]" = field(default=(), metadata=OMIT_EMPTY)

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "norm", "identity"):
            raise ValueError(f"unknown branch kind {self.kind!r}")
        if any(op not in ("mul", "div", "module") or op == "module" and not isinstance(v, str) for op, v in self.scale):
            raise ValueError(f"unknown branch scale {self.scale!r}")


@dataclass(frozen=True)
class Merge:
    """A sum of parallel branches reading one tensor, merged into one conv placed at ``into``
    (the main branch's module), inside ``block`` (the module whose forward computes the sum;
    ``node`` names the sum in its traced graph)."""

    block: str
    node: str
    into: str
    branches: tuple[Branch, ...]
    #: where the merged conv is placed when not at ``into``: the block itself when its forward was
    #: the sum alone (RepViT's ``RepVggDw``), or the block's child that held only the merged branches
    #: (MobileOne's ``conv_kxk`` list), so the forward reaches it in one lookup
    at: str = field(default="", metadata=OMIT_EMPTY)

    @property
    def norms(self) -> list[str]:
        return [b.norm for b in self.branches if b.norm]

    @property
    def place(self) -> str:
        """The merged conv's name in the fused model."""
        return self.at or self.into


@dataclass(frozen=True)
class MergeSkip:
    """A sum of branches left as it is, and why."""

    block: str
    reason: str


#: the ops a branch's output may be read by first: those of the linear tree it is a leaf of
_LINEAR_READS = frozenset(("add", "sub", "mul", "div", "neg"))


def writes_in_place(node: "fx.Node", block: "nn.Module") -> bool:
    """Whether ``node`` may change its first argument in place (``relu_``, ``+=``, ``inplace=True``)."""
    name = getattr(node.target, "__name__", str(node.target))
    if node.op in ("call_function", "call_method"):
        return name.endswith("_") and not name.startswith("_") or name.startswith("__i") or \
            bool(node.kwargs.get("inplace"))
    if node.op == "call_module":
        return bool(getattr(block.get_submodule(str(node.target)), "inplace", False))
    return False


def _identity_norm(norm: "nn.Module") -> "str | None":
    """Why this BatchNorm is not a plain affine map (None when it is)."""
    from torch import nn

    rule, why = norm_rule(norm)
    if rule is None:
        return why or "not a BatchNorm bnfuse can read"
    for extra in ("act", "drop"):
        part = getattr(norm, extra, None)
        if part is not None and not isinstance(part, nn.Identity):
            return f"it applies {type(part).__name__} after normalising"
    return None


def branch_of(name: str, module: "nn.Module", rec: "Recorder", folds: "dict[str, tuple[str, str]]") -> "tuple[Branch | None, Any, str | None]":
    """Classify one child: (branch, its conv or None, why it is not a linear branch).  Its output
    must be read first by the sum: an in-place activation after a BatchNorm (``SiLU(inplace=True)``)
    returns the same tensor, changed, and shows up here as an earlier read."""
    branch, conv, why = _classify(name, module, rec, folds)
    if branch is None:
        return branch, conv, why
    call = single_call(module, rec)
    reads = rec.reads.get(id(call.output)) if call is not None and call.output is not None else None
    if reads is None and branch.kind == "norm" and branch.norm != branch.module:
        return branch, conv, why  # a module that is its BatchNorm (checked on its forward): its output is not watched
    # first read by the sum: ``out = scale(x); out += conv(x)`` accumulates into the first branch's
    # tensor, so what reads the finished sum later reads that same tensor (and is fine)
    if not reads or reads[0][1] not in _LINEAR_READS:
        ops = ", ".join(op for _, op in reads or []) or "nothing bnfuse saw"
        return None, None, f"the output of {name} is read by {ops}, not by the sum alone"
    return branch, conv, why


def _classify(name: str, module: "nn.Module", rec: "Recorder", folds: "dict[str, tuple[str, str]]") -> "tuple[Branch | None, Any, str | None]":
    """What one child computes, by the recorded data flow: a conv (its BN folded), a BN, or neither."""
    from ...layers import plain_layer

    call = single_call(module, rec)
    if call is None:
        return None, None, f"{name} is called more than once"
    if is_producer_like(module):
        rule, why = producer_rule(module)
        if rule is None or rule.kind not in ("conv", "linear") or rule.transposed or not plain_layer(module):
            return None, None, f"{name} is not a plain Conv or Linear ({why or type(module).__name__})"
        holders = [q for _, q in rec.holders.get(id(module.weight), []) if q != f"{rec.names.get(id(module))}.weight"]
        if holders:  # a merged conv is a new one: the tie would be cut and the weight held twice
            return None, None, f"{name}'s weight is also {holders[0]}"
        why = producer_problem(module, rec)  # its hooks, its weight read elsewhere: the merged conv replaces it
        return (None, None, why) if why else (Branch("conv", name), module, None)
    if is_norm_like(module):
        why = _identity_norm(module) or norm_problem(module, rec) or (
            "it runs in training mode (batch statistics)" if call.training else None)
        return (None, None, f"{name}: {why}") if why else (Branch("norm", name, name), None, None)
    why = hooks(module, name, rec)
    if why:  # a branch module is replaced with the others by the merged conv
        return None, None, why
    inner = [(n, m) for n, m in module.named_modules() if n and (is_producer_like(m) or is_norm_like(m))]
    convs = [(n, m) for n, m in inner if is_producer_like(m) and rec.calls.get(id(m))]
    norms = [(n, m) for n, m in inner if is_norm_like(m) and rec.calls.get(id(m))]
    if not convs:
        inner_norm = _norm_only(name, module, rec)
        if inner_norm is not None:
            why = _identity_norm(module.get_submodule(inner_norm[len(name) + 1:]))
            return (None, None, f"{inner_norm}: {why}") if why else (Branch("norm", name, inner_norm), None, None)
        return None, None, f"{name} is a {type(module).__name__}, not a conv, a BatchNorm or the input itself"
    if len(convs) != 1 or len(norms) > 1:
        return None, None, f"{name} holds {len(convs)} called convs and {len(norms)} BatchNorms, not one conv and its BN"
    (cname, conv), = convs
    branch, _, why = _classify(f"{name}.{cname}", conv, rec, folds)
    pcall = single_call(conv, rec)
    if branch is None or pcall is None:
        return None, None, why or f"{name}.{cname} is called more than once"
    into, out = pcall.input, pcall.output
    if norms:
        nname, norm = norms[0]
        ncall = single_call(norm, rec)
        producer, direction = folds.get(f"{name}.{nname}", (None, None))
        if producer != f"{name}.{cname}" or ncall is None:
            return None, None, f"{name}.{nname} is not folded into {name}.{cname}"
        why = _identity_norm(norm)
        if why:
            return None, None, f"{name}.{nname}: {why}"
        if direction == "backward" and ncall.input is out:
            out = ncall.output
        elif direction == "forward" and ncall.output is into:  # a BatchNorm1d before a Linear head
            into = ncall.input
        else:
            return None, None, f"{name}.{nname} is not next to {name}.{cname}"
    if into is not call.input:
        return None, None, f"{name}.{cname} does not read the block's input directly"
    if call.output is not out:
        return None, None, f"{name} does more than its {'Linear' if rule_kind(conv) == 'linear' else 'conv'} and BatchNorm"
    return Branch("conv", name), conv, None


def _norm_only(name: str, module: "nn.Module", rec: "Recorder") -> "str | None":
    """The BatchNorm child of a module whose forward is that BatchNorm on its input, plus zeros,
    through eval-mode identities (FastViT's ``MobileOneBlock`` holding only a BN: ``0 + bn(x)``)."""
    try:
        graph = trace_block(module)
    except Exception:  # noqa: BLE001 - a forward fx cannot follow: not a branch bnfuse can read
        return None

    def through(n: Any) -> bool:
        return passthrough(n, module, rec)

    out = next(n for n in graph.nodes if n.op == "output").args[0]
    while hasattr(out, "op") and through(out) and out.args:
        out = out.args[0]
    leaves = dict(linear_trees(graph, lambda n: False, through)).get(out, [(out, ())])
    nodes = [a for a, f in leaves if hasattr(a, "op")]
    if len(nodes) != 1 or any(f or not hasattr(a, "op") and a != 0 for a, f in leaves):
        return None
    n = nodes[0]
    if n.op != "call_module" or len(n.args) != 1 or getattr(n.args[0], "op", None) != "placeholder" \
            or not is_norm_like(module.get_submodule(str(n.target))):
        return None
    return f"{name}.{n.target}"


def rule_kind(module: "nn.Module") -> "str | None":
    """``conv`` or ``linear`` for a producer bnfuse merges, else None."""
    rule, _ = producer_rule(module)
    return rule.kind if rule is not None else None


def flat_pair(n: Any, block: "nn.Module") -> Any:
    """The conv call of a leaf that is a BatchNorm child reading a conv child that only it reads
    (a branch written as two children of the block: ``self.bn1(self.conv1(x))``), else None."""
    if not hasattr(n, "op") or n.op != "call_module" or len(n.args) != 1 or n.kwargs:
        return None
    c = n.args[0]
    if not hasattr(c, "op") or c.op != "call_module" or len(c.users) != 1 or len(c.args) != 1 or c.kwargs:
        return None
    if not is_norm_like(block.get_submodule(str(n.target))) or not is_producer_like(block.get_submodule(str(c.target))):
        return None
    return c


def flat_branch(block_name: str, block: "nn.Module", conv_node: Any, norm_node: Any, rec: "Recorder",
                 folds: "dict[str, tuple[str, str]]") -> "tuple[Branch | None, Any, str | None]":
    """A conv child and the BatchNorm child after it as one branch: the BN must fold into the conv and
    be read by the sum alone."""
    cname, nname = child_name(block_name, conv_node.target), child_name(block_name, norm_node.target)
    conv, norm = block.get_submodule(str(conv_node.target)), block.get_submodule(str(norm_node.target))
    branch, _, why = _classify(cname, conv, rec, folds)
    if branch is None:
        return None, None, why
    if folds.get(nname) != (cname, "backward"):
        return None, None, f"{nname} does not fold into {cname}"
    why = _identity_norm(norm)
    if why:
        return None, None, f"{nname}: {why}"
    call = single_call(norm, rec)
    reads = rec.reads.get(id(call.output)) if call is not None and call.output is not None else None
    if not reads or reads[0][1] not in _LINEAR_READS:
        ops = ", ".join(op for _, op in reads or []) or "nothing bnfuse saw"
        return None, None, f"the output of {nname} is read by {ops}, not by the sum alone"
    return Branch("conv", cname, nname), conv, None


