"""A block's own forward as a ``torch.fx`` graph one level deep (every child one call), or down to
torch's layers, and the one way a pass rewrites it: edit the graph, and the block becomes a
``GraphModule`` of it (the model itself when the block is the model's own forward); and the one
resolver of a held tensor's qualified name (:func:`held`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import fx, nn

    from .record import Recorder

__all__ = ["trace_block", "rewrite_forward", "child_name", "held", "skip_identities", "skip_identity_calls", "passthrough",
           "single_call"]


def child_name(block_name: str, target: Any) -> str:
    """The dotted name of the block's child ``target`` (the model's own child for the block "")."""
    return f"{block_name}.{target}" if block_name else str(target)


def held(model: "nn.Module", qual: str) -> Any:
    """The tensor the model holds under the qualified name ``qual``: a parameter, a buffer or a
    module's plain tensor attribute (None for "": a step's tensor that was not given; AttributeError
    for a name it does not hold)."""
    if not qual:
        return None
    mod, _, attr = qual.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


def trace_block(block: "nn.Module", deep: bool = False) -> "fx.Graph":
    """The block's forward as an fx graph in which every child module is one call; ``deep``: traced
    through its children down to torch's own layers (a Conv inside a wrapper inside a Sequential is
    one call of the block's graph, under its dotted name)."""
    from torch import fx

    from .patterns import is_norm_like, is_producer_like

    class _ChildrenAsLeaves(fx.Tracer):
        def is_leaf_module(self, m: "nn.Module", qualname: str) -> bool:  # noqa: ARG002
            return True

    class _LayersAsLeaves(fx.Tracer):
        def is_leaf_module(self, m: "nn.Module", qualname: str) -> bool:
            return is_producer_like(m) or is_norm_like(m) or super().is_leaf_module(m, qualname)

    # tracing runs the forward with proxies: whatever it stores on the modules it runs is undone
    mods = list(block.modules()) if deep else [block]
    saved = [(m, dict(m.__dict__)) for m in mods]
    tables = [{k: dict(v) for k, v in d.items() if k in ("_modules", "_parameters", "_buffers")} for _, d in saved]
    try:
        graph = (_LayersAsLeaves() if deep else _ChildrenAsLeaves()).trace(block)
        # tensors the forward reads that no module holds (a global, a closure, a tensor made at trace
        # time) are stored on the block by the tracer as ``_tensor_constantN``: kept with the graph
        graph._bnfuse_constants = {k: v for k, v in vars(block).items()  # type: ignore[attr-defined]
                                   if k.startswith("_tensor_constant") and k not in saved[0][1]}
        return graph
    finally:
        for (m, d), t in zip(saved, tables):
            m.__dict__.clear()
            m.__dict__.update(d)
            for k, v in t.items():
                d[k].clear()
                d[k].update(v)


def skip_identities(block: "nn.Module", graph: "fx.Graph") -> None:
    """Call no ``nn.Identity`` child (a folded BatchNorm's stand-in, an absent attention): its input
    is its output.  It holds no state, so the state_dict is unchanged; each call skipped is one
    module call less per forward (about 1.5 us on a CPU at batch 1)."""
    from torch import nn

    for node in list(graph.nodes):
        if (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
                and type(block.get_submodule(str(node.target))) is nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def skip_identity_calls(gm: "fx.GraphModule") -> None:
    """Take the calls of ``nn.Identity`` children out of a rewritten block's forward (a BatchNorm a
    later round folded into the layer before it), and drop those children."""
    skip_identities(gm, gm.graph)
    gm.delete_all_unused_submodules()
    gm.recompile()
    _plain_call(gm)


def _plain_call(gm: "fx.GraphModule") -> None:
    """Let ``gm`` be called as any module is: ``recompile`` wraps each call in a frame that only
    rewrites the message of an exception, which costs about 2% of a merged MobileOne's forward at
    batch 1 (measured 2026-12-05).  Each GraphModule has a class of its own, so only ``gm`` changes
    (a copy made by ``copy.deepcopy`` or unpickling gets the wrapper back, and is otherwise the same)."""
    from torch import fx

    cls = type(gm)
    if cls is not fx.GraphModule and "__call__" in vars(cls):
        del cls.__call__


def rewrite_forward(model: "nn.Module", block_name: str, edit: "Callable[[nn.Module, fx.Graph], None]",
                    deep: bool = False) -> "nn.Module":
    """Trace ``block_name``'s forward, let ``edit(block, graph)`` change the graph (and add children to
    the block), then put a ``GraphModule`` of it in the block's place: dead nodes, calls of
    ``nn.Identity`` and the children nothing calls any more are dropped (from the state_dict too).
    ``deep``: traced down to torch's own layers (:func:`trace_block`).  Returns the model, or the new
    root when ``block_name`` is "" (the model's own forward)."""
    from torch import fx

    block = model.get_submodule(block_name) if block_name else model
    graph = trace_block(block, deep)
    edit(block, graph)
    # dead code goes before the GraphModule copies what its graph reads (a merged container, a folded
    # scale): a child call counts as pure, as fx's own rule has it for modules not marked impure
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_module" and n.is_impure())
    skip_identities(block, graph)
    constants = getattr(graph, "_bnfuse_constants", {})
    for k, v in constants.items():  # not saved: the model's code makes them again when it is rebuilt
        block.register_buffer(k, v, persistent=False)
    try:
        gm = fx.GraphModule(block, graph, class_name=type(block).__name__)
    finally:
        for k in constants:
            delattr(block, k)
    gm.delete_all_unused_submodules()
    gm.recompile()
    _plain_call(gm)
    gm.train(block.training)
    if not block_name:
        return gm
    model.set_submodule(block_name, gm)
    return model


#: modules that are the identity in eval mode (when their recorded call returned its input)
_EVAL_IDENTITIES = ("Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "DropPath",
                    "StochasticDepth", "DropBlock2d")


def passthrough(node: "fx.Node", block: "nn.Module", rec: "Recorder") -> bool:
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


def single_call(module: "nn.Module", rec: "Recorder") -> Any:
    """The one recorded call of ``module``, or None when it was called never or more than once."""
    calls = rec.calls.get(id(module)) or rec.module_calls.get(id(module)) or []
    return calls[0] if len(calls) == 1 else None
