"""What the graph of a ``.pt2`` archive may hold before ``torch.export.load`` reads it.

Three parts of an exported program's graph (``models/NAME.json``) become running Python when torch
loads or runs it, with no pickle involved:

- every shape expression (``expr_str``) is parsed by ``sympy.sympify``, which evaluates it with ``eval``
  while the archive is loaded;
- every node's ``target`` is looked up by name from ``torch``, ``math`` and ``operator`` (``torch.os.system``
  is a name it resolves), and the program calls it when it runs; torch's verifier refuses most targets that
  are not operators when it builds the program, after the lookup;
- the input guards (``guards_code``) are pasted into a function that ``ep.module()`` compiles with ``exec``
  and calls on every input.

bnfuse reads the JSON first and lets through only what torch itself writes there: targets that are torch
operators (``torch.ops.NS.OP.OVERLOAD``, ``torch.ops.higher_order.OP``) or the few functions torch's own
verifier allows (symbolic arithmetic such as ``_operator.add``, ``math.ceil``, ``torch.sym_max``, and the
grad-mode and autocast switches), shape expressions in sympy's printed
form (``Add(Symbol('s0', integer=True), Integer(1))``), and guards that compare arithmetic on the inputs'
sizes.  Anything else is named, and the file refused, unless the caller allows code from the file.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterator

__all__ = ["unsafe_graph_parts"]

#: the targets besides operators that torch's verifier allows (``allowed_builtin_ops`` and its allowed torch
#: functions, less the functorch helpers), as torch's serializer names them (module and name)
SYM_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "abs", "not_", "mul", "add", "sub",
                                "floordiv", "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift", "getitem")]
    + ["math.trunc", "math.ceil", "math.floor"]
    + [f"torch.{n}" for n in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt",
                              "sym_sum")]
    + ["torch.autograd.grad_mode.set_grad_enabled", "torch._C._set_grad_enabled",
       "torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast",
       "torch.fx.experimental.symbolic_shapes.cast_symbool_to_symint_guardless"])
_OP_NAME = re.compile(r"torch\.ops\.[A-Za-z_]\w*\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)?")

#: sympy's printed form: the constructors it calls (torch's own sympy functions are added when checked)
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair", "sqrt",
})
_SYMPY_KEYWORDS = frozenset({"positive", "negative", "integer", "real", "nonnegative", "nonpositive", "nonzero",
                             "finite", "commutative", "precision", "evaluate", "zero", "even", "odd", "rational"})
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)")
_IDENT = re.compile(r"[A-Za-z_]\w*")
#: the longest expression or guard read (sympy's parser and Python's compiler are not for megabytes)
_MAX_TEXT = 20_000
#: the largest literal exponent of a power (10**10**9 would be computed in full)
_MAX_EXPONENT = 64

#: what a guard may call: Python's own arithmetic, torch's helpers in the guard's namespace, ``math`` and
#: ``torch.sym_*`` functions, and a tensor input's size queries
_GUARD_CALLS = frozenset({"max", "min", "abs", "int", "float", "round", "IsNonOverlappingAndDenseIndicator",
                          "cast_symbool_to_symint_guardless"})
_GUARD_MATH = frozenset({"floor", "ceil", "trunc", "sqrt", "isnan", "isinf", "isfinite", "log", "log2", "exp",
                         "pow", "fabs", "copysign", "fmod", "gcd"})
_GUARD_TORCH = frozenset({"sym_max", "sym_min", "sym_int", "sym_float", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"})
_TENSOR_QUERIES = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr,
               ast.BitXor, ast.LShift, ast.RShift, ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.And, ast.Or,
               ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def unsafe_graph_parts(graph: Any, allowed_target: Any = None) -> Iterator[str]:
    """For each part of a program's JSON (``models/NAME.json``, parsed) that would run as code: why, in words.

    ``allowed_target(name)`` says whether a ``torch.ops`` name resolves to an operator (default: any
    name of that form)."""
    targets = {node.get("target") if isinstance(node.get("target"), str) else repr(node.get("target"))
               for node in _dicts_with(graph, "target")}
    for target in sorted(targets):
        if not _is_operator(target, allowed_target):
            yield (f"has a graph node that calls {target[:120]!r}, which is not a torch operator: the program "
                   "would call it when it runs")
    calls = _SYMPY_CALLS | _torch_sympy_functions()
    exprs = {h.get("expr_str") if isinstance(h.get("expr_str"), str) else repr(h.get("expr_str"))
             for h in _dicts_with(graph, "expr_str")}  # each text once: a graph repeats them many times
    for expr in sorted(exprs, key=len):
        why = _sympy_problem(expr, calls)
        if why:
            yield (f"has the shape expression {expr[:120]!r}, which {why}: torch.export.load evaluates these "
                   "expressions with Python's eval (sympy.sympify)")
    guards = graph.get("guards_code", []) if isinstance(graph, dict) else []
    for guard in sorted({g if isinstance(g, str) else repr(g) for g in (guards if isinstance(guards, list)
                                                                       else [guards])}, key=len):
        why = _guard_problem(guard)
        if why:
            yield (f"has the input guard {guard[:120]!r}, which {why}: ep.module() compiles the guards into "
                   "Python code that runs on every call")


def _dicts_with(obj: Any, key: str) -> Iterator[dict]:
    """Every dict in the JSON ``obj`` (at any depth) that has ``key``."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item and (key != "target" or "inputs" in item):
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _is_operator(target: str, allowed: Any) -> bool:
    if target in SYM_TARGETS:
        return True
    if not _OP_NAME.fullmatch(target) or "__" in target:
        return False
    return allowed is None or allowed(target)


def _sympy_problem(text: str, calls: frozenset) -> "str | None":
    """Why ``text`` is not sympy's printed form of arithmetic on integers and symbols, calling only ``calls``
    (None when it is)."""
    tree = _parse(text)
    if isinstance(tree, str):
        return tree
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in calls:
                return f"calls {ast.unparse(node.func)[:60]}, which is not one of sympy's arithmetic constructors"
            if any(k.arg not in _SYMPY_KEYWORDS for k in node.keywords):
                return "passes a keyword sympy's printed form never has"
            strings = [a for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if strings and not _plain_string_argument(name, node):
                return f"gives {name} a text argument sympy would parse as code"
            if name in ("Pow", "PowByNatural", "FloatPow") and len(node.args) == 2 and _too_big_power(node.args[1]):
                return f"raises a number to a power above {_MAX_EXPONENT}"
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, int) and abs(node.value) > 2 ** 64:
                return "has an integer beyond 64 bits"
        elif isinstance(node, ast.Name):
            if node.id.startswith("__"):
                return f"names {node.id}"
        elif not isinstance(node, (ast.Expression, ast.keyword, ast.Load, ast.UnaryOp, ast.USub, ast.UAdd)):
            return f"is not sympy's printed form (it has {type(node).__name__.lower()} syntax)"
    return None


def _plain_string_argument(name: str, node: ast.Call) -> bool:
    """Text sympy does not parse: a symbol's name (``Symbol('s0')``) or a number (``Float('1.5')``)."""
    args = node.args
    if not args or not isinstance(args[0], ast.Constant) or any(
            isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args[1:]):
        return False
    first = args[0].value
    return (name == "Symbol" and bool(_IDENT.fullmatch(first))) or (name == "Float" and bool(_NUMBER.fullmatch(first)))


def _too_big_power(exponent: ast.AST) -> bool:
    """A literal exponent above the limit (a symbolic one is never computed while loading)."""
    if isinstance(exponent, ast.Call) and isinstance(exponent.func, ast.Name) and exponent.func.id == "Integer" \
            and exponent.args and isinstance(exponent.args[0], ast.Constant):
        value = exponent.args[0].value
        return isinstance(value, int) and abs(value) > _MAX_EXPONENT
    return False


def _torch_sympy_functions() -> frozenset:
    """The sympy functions of ``torch.utils._sympy.functions`` (FloorDiv, ModularIndexing, ...), which torch's
    deserializer gives sympify by name."""
    from torch.utils._sympy import functions

    return frozenset(n for n, v in vars(functions).items()
                     if not n.startswith("_") and isinstance(v, type) and v.__module__ == functions.__name__)


def _parse(text: str) -> "ast.Expression | str":
    if len(text) > _MAX_TEXT:
        return f"is {len(text)} characters long"
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "is not a Python expression"


def _guard_problem(text: str) -> "str | None":
    """Why ``text`` is not a comparison of arithmetic on the inputs' sizes (None when it is)."""
    if any(c in text for c in "#\\\"\n\r"):
        return "has a character that would change the code it is pasted into"
    tree = _parse(text)
    if isinstance(tree, str):
        return tree
    for node in ast.walk(tree):
        why = _guard_node_problem(node)
        if why:
            return why
    return None


def _guard_node_problem(node: ast.AST) -> "str | None":
    if isinstance(node, (ast.Expression, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp,
                         *_ARITHMETIC)):
        return None
    if isinstance(node, ast.Constant):
        return None if isinstance(node.value, (int, float, bool, str, type(None))) else "has a constant of another kind"
    if isinstance(node, ast.Name):
        return None if node.id in _GUARD_CALLS | {"L", "math", "torch", "inf"} else f"names {node.id}"
    if isinstance(node, ast.Subscript):
        return None if _is_input(node.value) or _is_size_query(node.value) else "indexes something other than an input"
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in ("math", "torch"):
            allowed = _GUARD_MATH if node.value.id == "math" else _GUARD_TORCH
            return None if node.attr in allowed else f"uses {node.value.id}.{node.attr}"
        return None if _is_input(node.value) and not node.attr.startswith("_") else f"reads the attribute {node.attr}"
    if isinstance(node, ast.Call):
        return None if _guard_call_ok(node) else f"calls {ast.unparse(node.func)[:60]}"
    return f"has {type(node).__name__.lower()} syntax"


def _guard_call_ok(node: ast.Call) -> bool:
    func = node.func
    if node.keywords:
        return False
    if isinstance(func, ast.Name):
        return func.id in _GUARD_CALLS
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("math", "torch"):
        return func.attr in (_GUARD_MATH if func.value.id == "math" else _GUARD_TORCH)
    return _is_size_query(func, called=True)


def _is_size_query(node: ast.AST, called: bool = False) -> bool:
    """``INPUT.size`` (the callee) or ``INPUT.size()`` (its result), likewise stride, storage_offset, dim, numel."""
    if not called:
        return isinstance(node, ast.Call) and _is_size_query(node.func, called=True) and not node.keywords
    return isinstance(node, ast.Attribute) and node.attr in _TENSOR_QUERIES and _is_input(node.value)


def _is_input(node: ast.AST) -> bool:
    """``L['x']``, ``L['x'][0]``, ``L['x'].field``: a path into the inputs, by constant keys."""
    while True:
        if isinstance(node, ast.Name):
            return node.id == "L"
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            node = node.value
        elif isinstance(node, ast.Attribute) and not node.attr.startswith("_") and node.attr not in _TENSOR_QUERIES:
            node = node.value
        else:
            return False
