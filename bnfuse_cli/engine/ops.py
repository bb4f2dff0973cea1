"""The names of the torch operations the recorder (:mod:`bnfuse_cli.engine.record`) tells apart:
what only looks at metadata, what returns its input untouched, what reshapes, adds, concatenates or
moves axes, and how an op's name reads in a sentence."""

from __future__ import annotations

from typing import Any

__all__ = ["pretty_op", "op_name", "METADATA", "PASSTHROUGH", "VALUE_FREE", "SELF_ONLY", "RESHAPES", "ADDS", "CATS", "MOVES", "POOLS",
           "ACTIVATIONS"]

#: reads that look only at a tensor's metadata, never its values
METADATA = frozenset(
    """size dim shape dtype device ndim numel nelement __len__ is_floating_point is_complex
    stride requires_grad is_cuda layout names is_sparse is_quantized is_meta is_nested grad_fn
    is_leaf element_size get_device is_contiguous storage_offset __hash__ is_mkldnn is_xpu
    is_cpu""".split()
)

#: ops that return their first argument itself when there is nothing to do (same dtype, already
#: contiguous, dropout in eval): then nothing new was read or made, and nothing is recorded
PASSTHROUGH = frozenset(
    """to type_as contiguous float double half bfloat16 cpu cuda type dropout dropout1d dropout2d
    dropout3d alpha_dropout feature_alpha_dropout""".split()
)
#: ops that look only at their arguments' shape, dtype and device (their result is recorded)
VALUE_FREE = frozenset(
    "new_zeros new_ones new_empty new_full zeros_like ones_like empty_like full_like rand_like randn_like".split()
)
#: ops that read the values of their first argument only (the second gives a dtype or shape)
SELF_ONLY = frozenset("type_as reshape_as view_as expand_as".split())
#: reshapes that can keep a producer's channel axis as axis 1 of a 2-D BatchNorm1d input
#: (levit's ``bn(linear(x).flatten(0, 1))``); results of these on a producer output are watched
RESHAPES = frozenset("flatten reshape view squeeze unsqueeze".split())
#: additions and subtractions: a module inside whose call one runs may hold parallel branches to merge
ADDS = frozenset("add add_ __add__ __iadd__ __radd__ sub sub_ __sub__ __isub__ __rsub__".split())
#: concatenations; a cat of producer outputs along axis 1 is watched (MixNet's MixedConv2d)
CATS = frozenset("cat concat concatenate".split())
#: layout ops a BatchNorm's output is followed through, to a Linear it may fold into (FastViT's
#: ``x.flatten(2).transpose(-2, -1)`` before ``qkv``)
MOVES = frozenset("flatten transpose permute".split())
#: means over axes (global average pooling) a per-channel map's output is followed through, to a Linear
#: it may fold into (ResMLP's ``head(norm(x).mean(1))``, ``fc(flatten(avgpool(bn(x))))``)
POOLS = frozenset("mean adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d".split())


#: activations that act on each element alone, as module classes, functions and tensor methods (the
#: horizontal pass applies one once to a wider layer's output instead of once per sibling)
ACTIVATIONS = frozenset(
    """ReLU ReLU6 GELU SiLU Sigmoid Tanh Hardswish Hardsigmoid Hardtanh LeakyReLU ELU SELU CELU Mish Softplus
    relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu celu mish softplus""".split()
)


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name in ("__get__", "__set__"):
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


#: operator names whose ``__iop__``/``__rop__`` forms are the same operation for a reader
BINARY_OPS = frozenset(
    "add sub mul truediv floordiv div matmul mod pow and or xor lshift rshift".split()
)
OP_WORDS = {"truediv": "div", "floordiv": "floor_divide", "getitem": "indexing", "setitem": "index assignment"}


def pretty_op(op: str) -> str:
    """A readable name for a recorded op: ``__add__``/``__iadd__``/``__radd__``/``add_`` ->
    ``add``, ``relu_`` -> ``relu``, ``__getitem__`` -> ``indexing``."""
    name = op
    if op.startswith("__") and op.endswith("__") and len(op) > 4:
        name = op[2:-2]
        if name[:1] in ("i", "r") and name[1:] in BINARY_OPS:
            name = name[1:]
    elif op.endswith("_") and not op.startswith("_"):
        name = op.rstrip("_")
    return OP_WORDS.get(name, name)
