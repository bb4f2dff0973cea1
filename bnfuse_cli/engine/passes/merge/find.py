"""Find sums of parallel branches that can become one layer (structural re-parameterisation).

A *block* is a module inside whose forward a tensor sum ran during the recorded pass.  Its forward
is traced with ``torch.fx`` one level deep (every child is a leaf), and every linear tree in it
(additions, subtractions, scalings by numbers, held per-channel tensors or layer-scale modules,
through eval-mode identities such as ``drop_path``: :func:`bnfuse_cli.engine.sums.linear_trees`)
is flattened into leaves, each with its factors.  The tree merges when every leaf is a *branch*
that reads the same tensor ``x`` (:mod:`bnfuse_cli.engine.merge_branches`): a conv or Linear (its
BatchNorm folded into it), a BatchNorm on ``x``, or ``x`` itself; when the convs agree in stride,
dilation, groups and channels and their kernel centres align; when every factor is one value or
one per channel; and when each branch is called once and does nothing else (checked on the
recorded data flow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...forward import child_name, passthrough, single_call, trace_block
from ...patterns import is_norm_like, is_producer_like
from ...plan import Plan
from ...sums import channel_scale, held_value, linear_trees, per_channel_axis
from .branches import Branch, Merge, MergeSkip, branch_of, flat_branch, flat_pair, rule_kind, writes_in_place
from .kernels import centre_padding

if TYPE_CHECKING:
    from torch import fx, nn

    from ...record import Recorder

__all__ = ["find_merges"]

def _check_convs(convs: list[tuple[Branch, Any]], identities: bool) -> "tuple[int | None, str | None]":
    """Index of the main conv (the largest kernel), or why the convs cannot merge."""
    if any(rule_kind(c) == "linear" for _, c in convs):
        return _check_linears(convs, identities)

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


def _check_linears(convs: list[tuple[Branch, Any]], identities: bool) -> "tuple[int | None, str | None]":
    """Linear branches merge when every one is a Linear with the same features in and out."""
    main = convs[0][1]
    for b, c in convs:
        if rule_kind(c) != "linear":
            return None, f"{b.module} is a conv and {convs[0][0].module} a Linear"
        if (c.in_features, c.out_features) != (main.in_features, main.out_features):
            return None, f"{b.module} maps {c.in_features} -> {c.out_features} features, the main branch " \
                         f"{main.in_features} -> {main.out_features}"
    if identities and main.in_features != main.out_features:
        return None, "an identity branch needs as many input as output features"
    return 0, None


def _factors(block_name: str, block: "nn.Module", factors: "tuple[Any, ...]", shape: "tuple[int, ...]"
             ) -> "tuple[tuple[tuple[str, Any], ...] | None, str | None]":
    """A leaf's factors with model-level names, each a number, a scale module (probed by the tree's
    walk) or a held tensor checked to hold one value, or one per channel on axis 1 of a branch output
    of ``shape``; or why one does not."""
    out = []
    for op, value in factors:
        if isinstance(value, tuple):  # a held tensor, and the reshapes the forward applies to it
            target, reshapes = value
            name = child_name(block_name, target)
            t = held_value(block, target, reshapes)
            if t is None:
                return None, f"{op} by {name}: not a parameter or buffer the block holds as it reshapes it"
            if t.numel() != 1 and (per_channel_axis(t, len(shape)) != 1 or t.numel() != shape[1]):
                return None, f"{op} by {name} {tuple(t.shape)}: not one value per channel on axis 1 of {tuple(shape)}"
            out.append((op, name))
        else:
            out.append((op, child_name(block_name, value) if op == "module" else float(value)))
    return tuple(out), None


def _merge_tree(block_name: str, block: "nn.Module", root: "fx.Node", leaves: list[Any], rec: "Recorder",
                folds: "dict[str, tuple[str, str]]") -> "Merge | MergeSkip | None":
    """A Merge for this tree, a MergeSkip when it looks like branches but cannot merge, else None."""
    nodes = [a for a, _ in leaves if hasattr(a, "op")]
    if any(not hasattr(a, "op") and a != 0 for a, _ in leaves):
        return None  # a constant offset: not a sum of branches
    zero = any(not hasattr(a, "op") for a, _ in leaves)  # ``out = 0; out += conv(x)``: one branch
    if len(nodes) < (1 if zero else 2):
        return None
    factors = {a: f for a, f in leaves if hasattr(a, "op")}

    def source(n: Any) -> Any:  # what a child reads, through identities (RepGhost's fusion_conv)
        pair = flat_pair(n, block)
        a = (pair or n).args[0]
        while hasattr(a, "op") and passthrough(a, block, rec) and a.args:
            a = a.args[0]
        return a

    calls = [n for n in nodes if n.op == "call_module" and len(n.args) == 1 and not n.kwargs]
    reads = [source(n) for n in calls]
    x = max(set(reads), key=reads.count) if reads else None
    linear = [n for n in nodes if n is x or (n in calls and source(n) is x)]
    if x is None or not any(n is not x for n in linear) or len(linear) < min(2, len(nodes)):
        return None
    where = f"sum in {block_name or 'the model'}"
    if any(writes_in_place(u, block) for u in x.users if u not in nodes):
        return MergeSkip(block_name, f"{where}: the branches' input is changed in place in {block_name}")
    if len(linear) < len(nodes):
        return MergeSkip(block_name, f"{where}: not every branch reads the same tensor")
    branches, convs, why = _branches(block_name, block, nodes, x, rec, folds)
    if why is not None:
        return MergeSkip(block_name, f"{where}: {why}")
    if not convs:
        return MergeSkip(block_name, f"{where}: no conv branch to merge into")
    main_i, why = _check_convs(convs, any(b.kind != "conv" for b in branches))
    if main_i is None:
        return MergeSkip(block_name, f"{where}: {why}")
    out = single_call(convs[main_i][1], rec)
    shape = tuple(out.output.shape) if out is not None and out.output is not None else ()
    if rule_kind(convs[main_i][1]) == "linear" and len(shape) != 2:
        return MergeSkip(block_name, f"{where}: Linear branches merge on a 2-D input (features on axis 1), "
                                     f"not on {len(shape)}-D")
    scaled = []
    for n, b in zip(nodes, branches):
        f, why = _factors(block_name, block, factors[n], shape)
        if f is None:
            return MergeSkip(block_name, f"{where}: {why}")
        scaled.append(Branch(b.kind, b.module, b.norm, f))
    into = str(convs[main_i][0].module)
    at = block_name if _whole_block(block_name, block, root, x, rec) else _placement(block_name, block, into, scaled)
    return Merge(block_name, root.name, into, tuple(scaled), at)


def _whole_block(block_name: str, block: "nn.Module", root: "fx.Node", x: "fx.Node", rec: "Recorder") -> bool:
    """Whether the block's forward is the sum and nothing else: its one input is the branches' input,
    its output is the sum, and every other step feeds the sum (RepViT's ``RepVggDw``, a RepVGG block
    without its activation).  The merged conv then takes the block's own place: the forward calls
    the conv itself, as a hand-written re-parameterisation does, not a wrapper around it."""
    from torch import nn

    graph = root.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output")
    if (not block_name or inputs != [x] or out.args[0] is not root or len(root.users) != 1
            or single_call(block, rec) is None or type(block).__call__ is not nn.Module.__call__):
        return False
    seen, todo = {root}, [root]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return all(n in seen or n is out for n in graph.nodes)


def _placement(block_name: str, block: "nn.Module", into: str, branches: "list[Branch]") -> str:
    """The block's child that holds the main branch when each of its children is one of the merged
    branches and it holds nothing else (MobileOne's ``conv_kxk`` list): the merged conv takes its
    place.  Else "" (the conv goes at ``into``)."""
    rel = into[len(block_name) + 1:] if block_name else into
    top = rel.split(".")[0]
    if top == rel:
        return ""
    container, name = block.get_submodule(top), child_name(block_name, top)
    mods = {b.module for b in branches if b.module}
    if container._parameters or container._buffers or not all(f"{name}.{c}" in mods for c in container._modules):
        return ""
    return name


def _branches(block_name: str, block: "nn.Module", nodes: list[Any], x: Any, rec: "Recorder",
              folds: "dict[str, tuple[str, str]]") -> "tuple[list[Branch], list[tuple[Branch, Any]], str | None]":
    """Each leaf as a branch (and the conv ones with their convs), or why one is not a branch."""
    branches: list[Branch] = []
    convs: list[tuple[Branch, Any]] = []
    for n in nodes:
        if n is x:
            branches.append(Branch("identity"))
            continue
        name = child_name(block_name, n.target)
        if len(n.users) > 1:
            return [], [], f"the output of {name} is also read elsewhere"
        pair = flat_pair(n, block)
        if pair is not None:
            branch, conv, why = flat_branch(block_name, block, pair, n, rec, folds)
        else:
            branch, conv, why = branch_of(name, block.get_submodule(str(n.target)), rec, folds)
        if branch is None:
            return [], [], why
        branches.append(branch)
        if conv is not None:
            convs.append((branch, conv))
    return branches, convs, None


def _is_scale(block: "nn.Module", rec: "Recorder") -> Any:
    """Whether a child call multiplies its input by a per-channel constant (a layer scale)."""
    def check(node: "fx.Node") -> bool:
        module = block.get_submodule(str(node.target))
        if is_producer_like(module) or is_norm_like(module) or passthrough(node, block, rec):
            return False
        call = single_call(module, rec)
        return call is not None and call.input is not None and \
            channel_scale(module, tuple(call.input.shape))[0] is not None
    return check


def find_merges(model: "nn.Module", rec: "Recorder", plan: Plan) -> None:
    """Add every mergeable sum of branches to ``plan`` (and, as a MergeSkip, every sum of
    branches that cannot merge); BatchNorms absorbed by a merge leave ``plan.skipped``."""
    folds = {f.norm: (f.producer, f.direction) for f in plan.folds if f.channels is None}
    claimed: set[str] = set()
    for block_id in sorted(rec.sum_blocks, key=lambda i: rec.names.get(i, "")):
        block_name = rec.names.get(block_id)
        if block_name is None:
            continue
        block = model.get_submodule(block_name) if block_name else model
        if block._forward_hooks or block._forward_pre_hooks or single_call(block, rec) is None and block_name:
            continue
        try:
            graph = trace_block(block)
        except Exception:  # noqa: BLE001 - a forward fx cannot follow: its sums stay
            continue
        trees = linear_trees(graph, _is_scale(block, rec), lambda n, b=block: passthrough(n, b, rec))
        for root, leaves in trees:
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
