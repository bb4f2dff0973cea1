"""Find sums of parallel branches that can become one convolution (structural re-parameterisation).

A *block* is a module inside whose forward a tensor sum ran during the recorded pass.  Its forward
is traced with ``torch.fx`` one level deep (every child is a leaf), and every tree of additions is
flattened through additions and eval-mode identities (``drop_path``) whose intermediate results
nothing else reads.  The tree merges when every leaf is a *branch* that reads the same tensor
``x``: a conv (its BatchNorm folded into it), a BatchNorm on ``x``, or ``x`` itself; when the
convs agree in stride, dilation, groups and channels and their kernel centres align; and when
each branch is called once and does nothing else (checked on the recorded data flow).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from .forward import child_name, trace_block
from .merge_math import centre_padding
from .patterns import is_norm_like, is_producer_like, norm_rule, producer_rule
from .plan import Branch, Merge, MergeSkip, Plan

if TYPE_CHECKING:
    from torch import fx, nn

    from .record import Recorder

__all__ = ["find_merges", "sum_trees"]

_ADD_FUNCS = (operator.add, operator.iadd)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")


def _is_add(node: "fx.Node") -> bool:
    import torch

    if node.op == "call_function" and (node.target in _ADD_FUNCS or node.target is torch.add):
        return node.kwargs.get("alpha", 1) == 1 and not node.kwargs.get("out")
    return node.op == "call_method" and node.target in _ADD_METHODS and node.kwargs.get("alpha", 1) == 1


#: modules that are the identity in eval mode (when their recorded call returned its input)
_EVAL_IDENTITIES = ("Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "DropPath",
                    "StochasticDepth", "DropBlock2d")


def _passthrough(node: "fx.Node", block: "nn.Module", rec: "Recorder") -> bool:
    """A child call that returned its input unchanged on every recorded call: an eval-mode identity
    (``drop_path``, dropout).  An in-place activation also returns its input, changed: never this."""
    if node.op != "call_module":
        return False
    module = block.get_submodule(str(node.target))
    if type(module).__name__ not in _EVAL_IDENTITIES or getattr(module, "inplace", False) or module.training:
        return False
    if type(module).__name__ == "Identity":
        return True
    calls = rec.module_calls.get(id(module), [])
    return bool(calls) and all(c.input is not None and c.output is c.input for c in calls)


def sum_trees(graph: "fx.Graph", block: "nn.Module", rec: "Recorder") -> list[tuple["fx.Node", list[Any]]]:
    """Each tree of additions as (root node, leaves): leaves are fx nodes or Python numbers."""
    trees = []
    inside: set[Any] = set()
    for node in reversed(list(graph.nodes)):
        if not _is_add(node) or node in inside:
            continue
        leaves: list[Any] = []
        todo = list(node.args[:2])
        while todo:
            a = todo.pop()
            while hasattr(a, "op") and len(a.users) == 1 and _passthrough(a, block, rec) and a.args:
                a = a.args[0]
            if hasattr(a, "op") and len(a.users) == 1 and _is_add(a):
                inside.add(a)
                todo.extend(a.args[:2])
            else:
                leaves.append(a)
        trees.append((node, leaves))
    return trees


def _writes_in_place(node: "fx.Node", block: "nn.Module") -> bool:
    """Whether ``node`` may change its first argument in place (``relu_``, ``+=``, ``inplace=True``)."""
    name = getattr(node.target, "__name__", str(node.target))
    if node.op in ("call_function", "call_method"):
        return name.endswith("_") and not name.startswith("_") or name.startswith("__i") or \
            bool(node.kwargs.get("inplace"))
    if node.op == "call_module":
        return bool(getattr(block.get_submodule(str(node.target)), "inplace", False))
    return False


def _single_call(module: "nn.Module", rec: "Recorder") -> Any:
    calls = rec.calls.get(id(module)) or rec.module_calls.get(id(module)) or []
    return calls[0] if len(calls) == 1 else None


def _plain_conv(module: "nn.Module") -> bool:
    from torch import nn

    return type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


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


def _branch(name: str, module: "nn.Module", rec: "Recorder", folds: dict[str, str]) -> "tuple[Branch | None, Any, str | None]":
    """Classify one child: (branch, its conv or None, why it is not a linear branch).  Its output
    must be read first by the sum: an in-place activation after a BatchNorm (``SiLU(inplace=True)``)
    returns the same tensor, changed, and shows up here as an earlier read."""
    branch, conv, why = _classify(name, module, rec, folds)
    if branch is None:
        return branch, conv, why
    call = _single_call(module, rec)
    reads = rec.reads.get(id(call.output)) if call is not None and call.output is not None else None
    # first read by the sum: ``out = scale(x); out += conv(x)`` accumulates into the first branch's
    # tensor, so what reads the finished sum later reads that same tensor (and is fine)
    if not reads or reads[0][1] != "add":
        ops = ", ".join(op for _, op in reads or []) or "nothing bnfuse saw"
        return None, None, f"the output of {name} is read by {ops}, not by the sum alone"
    return branch, conv, why


def _classify(name: str, module: "nn.Module", rec: "Recorder", folds: dict[str, str]) -> "tuple[Branch | None, Any, str | None]":
    """What one child computes, by the recorded data flow: a conv (its BN folded), a BN, or neither."""
    call = _single_call(module, rec)
    if call is None:
        return None, None, f"{name} is called more than once"
    if is_producer_like(module):
        rule, why = producer_rule(module)
        if rule is None or rule.kind != "conv" or rule.transposed or not _plain_conv(module):
            return None, None, f"{name} is not a plain Conv ({why or type(module).__name__})"
        return Branch("conv", name), module, None
    if is_norm_like(module):
        why = _identity_norm(module) or ("it runs in training mode (batch statistics)" if call.training else None)
        return (None, None, f"{name}: {why}") if why else (Branch("norm", name, name), None, None)
    inner = [(n, m) for n, m in module.named_modules() if n and (is_producer_like(m) or is_norm_like(m))]
    convs = [(n, m) for n, m in inner if is_producer_like(m) and rec.calls.get(id(m))]
    norms = [(n, m) for n, m in inner if is_norm_like(m) and rec.calls.get(id(m))]
    if not convs:
        return None, None, f"{name} is a {type(module).__name__}, not a conv, a BatchNorm or the input itself"
    if len(convs) != 1 or len(norms) > 1:
        return None, None, f"{name} holds {len(convs)} called convs and {len(norms)} BatchNorms, not one conv and its BN"
    (cname, conv), = convs
    branch, _, why = _classify(f"{name}.{cname}", conv, rec, folds)
    pcall = _single_call(conv, rec)
    if branch is None or pcall is None or pcall.input is not call.input:
        return None, None, why or f"{name}.{cname} does not read the block's input directly"
    out = pcall.output
    if norms:
        nname, norm = norms[0]
        ncall = _single_call(norm, rec)
        if folds.get(f"{name}.{nname}") != f"{name}.{cname}" or ncall is None or ncall.input is not out:
            return None, None, f"{name}.{nname} is not folded into {name}.{cname}"
        why = _identity_norm(norm)
        if why:
            return None, None, f"{name}.{nname}: {why}"
        out = ncall.output
    if call.output is not out:
        return None, None, f"{name} does more than its conv and BatchNorm"
    return Branch("conv", name), conv, None


def _flat_pair(n: Any, block: "nn.Module") -> Any:
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


def _flat_branch(block_name: str, block: "nn.Module", conv_node: Any, norm_node: Any, rec: "Recorder",
                 folds: dict[str, str]) -> "tuple[Branch | None, Any, str | None]":
    """A conv child and the BatchNorm child after it as one branch: the BN must fold into the conv and
    be read by the sum alone."""
    cname, nname = child_name(block_name, conv_node.target), child_name(block_name, norm_node.target)
    conv, norm = block.get_submodule(str(conv_node.target)), block.get_submodule(str(norm_node.target))
    branch, _, why = _classify(cname, conv, rec, folds)
    if branch is None:
        return None, None, why
    if folds.get(nname) != cname:
        return None, None, f"{nname} does not fold into {cname}"
    why = _identity_norm(norm)
    if why:
        return None, None, f"{nname}: {why}"
    call = _single_call(norm, rec)
    reads = rec.reads.get(id(call.output)) if call is not None and call.output is not None else None
    if not reads or reads[0][1] != "add":
        ops = ", ".join(op for _, op in reads or []) or "nothing bnfuse saw"
        return None, None, f"the output of {nname} is read by {ops}, not by the sum alone"
    return Branch("conv", cname, nname), conv, None


def _check_convs(convs: list[tuple[Branch, Any]], identities: bool) -> "tuple[int | None, str | None]":
    """Index of the main conv (the largest kernel), or why the convs cannot merge."""
    def size(c: Any) -> int:
        n = 1
        for k in c.kernel_size:
            n *= k
        return n

    main_i = max(range(len(convs)), key=lambda i: size(convs[i][1]))
    main = convs[main_i][1]
    for b, c in convs:
        pointwise = all(k == 1 for k in c.kernel_size)  # a 1x1 kernel reads one tap: its dilation is moot
        for attr in ("stride", "dilation", "groups", "out_channels", "in_channels"):
            if attr == "dilation" and pointwise:
                continue
            if getattr(c, attr) != getattr(main, attr):
                return None, f"{b.module} has {attr} {getattr(c, attr)}, the main branch {getattr(main, attr)}"
        if isinstance(c.padding, str) or isinstance(main.padding, str) or c.padding_mode != "zeros":
            return None, f"{b.module} pads with {c.padding_mode} {c.padding!r}: only explicit zero padding merges"
        if centre_padding(main.padding, main.dilation, main.kernel_size, c.kernel_size) != tuple(c.padding):
            return None, f"{b.module}'s kernel centre does not align with the main branch's (padding {c.padding})"
    if identities:
        centred = tuple(d * (k - 1) // 2 for d, k in zip(main.dilation, main.kernel_size))
        if (main.in_channels != main.out_channels or any(s != 1 for s in main.stride)
                or any(k % 2 == 0 for k in main.kernel_size) or tuple(main.padding) != centred):
            return None, "an identity branch needs stride 1, as many input as output channels and a centred odd kernel"
    return main_i, None


def _merge_tree(block_name: str, block: "nn.Module", root: "fx.Node", leaves: list[Any], rec: "Recorder",
                folds: dict[str, str]) -> "Merge | MergeSkip | None":
    """A Merge for this tree, a MergeSkip when it looks like branches but cannot merge, else None."""
    nodes = [a for a in leaves if hasattr(a, "op")]
    if any(not hasattr(a, "op") and a != 0 for a in leaves):
        return None  # a constant offset: not a sum of branches
    if len(nodes) < 2:
        return None

    def source(n: Any) -> Any:  # what a child reads, through identities (RepGhost's fusion_conv)
        pair = _flat_pair(n, block)
        a = (pair or n).args[0]
        while hasattr(a, "op") and _passthrough(a, block, rec) and a.args:
            a = a.args[0]
        return a

    reads = [source(n) for n in nodes if n.op == "call_module" and len(n.args) == 1 and not n.kwargs]
    x = max(set(reads), key=reads.count) if reads else None
    linear = [n for n in nodes if n is x or (n.op == "call_module" and len(n.args) == 1 and not n.kwargs
                                               and source(n) is x)]
    if x is None or not any(n is not x for n in linear) or len(linear) < 2:
        return None
    where = f"sum in {block_name or 'the model'}"
    if any(_writes_in_place(u, block) for u in x.users if u not in nodes):
        return MergeSkip(block_name, f"{where}: the branches' input is changed in place in {block_name}")
    if len(linear) < len(nodes):
        return MergeSkip(block_name, f"{where}: not every branch reads the same tensor")
    branches: list[Branch] = []
    convs: list[tuple[Branch, Any]] = []
    for n in nodes:
        if n is x:
            branches.append(Branch("identity"))
            continue
        name = child_name(block_name, n.target)
        if len(n.users) > 1:
            return MergeSkip(block_name, f"{where}: the output of {name} is also read elsewhere")
        pair = _flat_pair(n, block)
        if pair is not None:
            branch, conv, why = _flat_branch(block_name, block, pair, n, rec, folds)
        else:
            branch, conv, why = _branch(name, block.get_submodule(str(n.target)), rec, folds)
        if branch is None:
            return MergeSkip(block_name, f"{where}: {why}")
        branches.append(branch)
        if conv is not None:
            convs.append((branch, conv))
    if not convs:
        return MergeSkip(block_name, f"{where}: no conv branch to merge into")
    main_i, why = _check_convs(convs, any(b.kind != "conv" for b in branches))
    if main_i is None:
        return MergeSkip(block_name, f"{where}: {why}")
    return Merge(block_name, root.name, str(convs[main_i][0].module), tuple(branches))


def find_merges(model: "nn.Module", rec: "Recorder", plan: Plan) -> None:
    """Add every mergeable sum of branches to ``plan`` (and, as a MergeSkip, every sum of
    branches that cannot merge); BatchNorms absorbed by a merge leave ``plan.skipped``."""
    folds = {f.norm: f.producer for f in plan.folds if f.direction == "backward" and f.channels is None}
    claimed: set[str] = set()
    for block_id in sorted(rec.sum_blocks, key=lambda i: rec.names.get(i, "")):
        block_name = rec.names.get(block_id)
        if block_name is None:
            continue
        block = model.get_submodule(block_name) if block_name else model
        if block._forward_hooks or block._forward_pre_hooks or _single_call(block, rec) is None and block_name:
            continue
        try:
            graph = trace_block(block)
        except Exception:  # noqa: BLE001 - a forward fx cannot follow: its sums stay
            continue
        for root, leaves in sum_trees(graph, block, rec):
            found = _merge_tree(block_name, block, root, leaves, rec, folds)
            if isinstance(found, Merge):
                mods = {b.module for b in found.branches if b.module}
                if mods & claimed:
                    continue
                claimed |= mods
                plan.merges.append(found)
            elif found is not None:
                plan.merge_skips.append(found)
    merged = {n for m in plan.merges for n in m.norms}
    plan.skipped = [s for s in plan.skipped if s.norm not in merged]
