"""What a pass is: the base every row of the table of passes extends, with the defaults most rows
share, and :class:`AffineFold`, the parent of the passes that fold one per-channel affine map into
a layer.

A pass is one kind of rewrite (fold a BatchNorm into a layer, merge a sum of branches into one
conv, ...).  It finds its sites in one recorded forward pass, plans items (each refusal a
sentence), applies them in place, writes them as rows of the fused file's record and reads them
back, rebuilds them on a freshly built model (``load``), describes each site so that the judge
(:mod:`bnfuse_cli.checks.sites`) can compute it in float64 before and after, and gives its rows to
the report.  A pass declares what the table reads of it (its names, its item types, its option);
its items' JSON, what they absorb and its report rows come from those declarations unless the pass
says otherwise.  Nothing here knows which passes exist: :data:`bnfuse_cli.engine.passes.PASSES`
does.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

from ..affine import affine_from_stats
from ..patterns import norm_rule, producer_rule

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..plan import Plan
    from ..record import Recorder
    from ..steps import SiteSpec

__all__ = ["Option", "Pass", "AffineFold", "Rows", "OMIT_EMPTY", "touched", "inside", "layer_axis", "norm_affine", "by_block"]


@dataclass(frozen=True)
class Option:
    """The option of an opt-in (or opt-out) pass, declared in its row: ``name`` is the library
    keyword and the key in ``plan.options``, the CLI flag is ``--name`` (underscores as dashes; with
    ``--no-name`` when the default is not off), ``help`` its text everywhere, ``default`` its value
    when not given: True, False, or None for "where names do not reach the user": on for an
    exported program (``.pt2``, ``.onnx``) and bench's fused side, off where the model or its
    state_dict keys reach the user (the library's ``fuse``, a ``.pth`` or ``.safetensors`` file)."""

    name: str
    help: str
    default: "bool | None" = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, given: "dict[str, bool]", names_reach_user: bool = True) -> bool:
        """The option's value: as ``given`` says, else its default where the model goes."""
        if self.name in given:
            return bool(given[self.name])
        return (not names_reach_user) if self.default is None else self.default


@dataclass
class Rows:
    """A pass's part of the report: a table of what it did (shown with --verbose) and one of what
    it left, each row a where and a reason."""

    title: str
    columns: "tuple[str, ...]"
    done: "list[tuple[str, ...]]"
    left_title: str
    left_what: str
    left: "list[tuple[str, str]]"
    #: one line for the summary table (label, text), or None when the pass has nothing to say
    summary: "tuple[str, str] | None" = None


class Pass:
    """One row of the table of passes.  A subclass sets the class attributes and implements
    :meth:`find`, :meth:`apply`, :meth:`rebuild`, :meth:`sites` and :meth:`row`; everything else
    has a default made from the declared item types."""

    #: the pass's name: its items' key in a :class:`~bnfuse_cli.engine.plan.Plan`, its sites' kind
    name: ClassVar[str]
    #: the key of its items in JSON reports and in a fused file's record (``folds``, ``merges``)
    key: ClassVar[str]
    #: the key of what it leaves, with reasons, in JSON reports (``skipped``, ``merge_skips``)
    left_key: ClassVar[str]
    #: the dataclass of its items; a record's row is one, field by field (:meth:`from_row`)
    item: ClassVar[type]
    #: how the summary says a BatchNorm its items remove went
    verb: ClassVar[str] = "removed"
    #: a round that applied items of this pass may let the next round find more (a BatchNorm after
    #: a merged conv): rounds go on while such a pass finds something
    again: ClassVar[bool] = False
    #: the option that turns the pass on or off; None: it always runs
    option: ClassVar["Option | None"] = None
    #: the fields of an item naming what the item rewrites: a pass leaves a layer another pass
    #: rewrites in the same round for the next round (:func:`touched`)
    rewrites: ClassVar["tuple[str, ...]"] = ("producer",)
    #: the fields of an item naming the BatchNorm-like layers it removes from the model
    absorbs: ClassVar["tuple[str, ...]"] = ("norm",)
    #: the report: the title of what it did and its columns; the title of what it left and what
    #: the left column names
    title: ClassVar[str] = ""
    columns: ClassVar["tuple[str, ...]"] = ()
    left_title: ClassVar[str] = ""
    left_what: ClassVar[str] = ""

    def __init_subclass__(cls, *, name: "str | None" = None, key: "str | None" = None,
                          left_key: "str | None" = None, item: "type | None" = None, **kwargs: Any) -> None:
        """A row's identity in its class line: ``class ChainPass(AffineFold, name="chain",
        key="chain_folds", left_key="chain_left", item=ChainFold)``."""
        super().__init_subclass__(**kwargs)
        for attr, value in (("name", name), ("key", key), ("left_key", left_key), ("item", item)):
            if value is not None:
                setattr(cls, attr, value)

    # --------------------------------------------------------------------- what each pass does

    def find(self, model: "nn.Module", rec: "Recorder", escapes: "dict[int, str]", plan: "Plan") -> None:
        """Add this pass's items and refusals to ``plan`` (``plan.of(name)``, ``plan.left_by(name)``)
        from the recorded forward pass; the passes before it in the table have added theirs."""
        raise NotImplementedError

    def apply(self, model: "nn.Module", items: "list[Any]") -> "nn.Module | None":
        """Carry out ``items`` on ``model`` in place; the new root module when the rewrite had to
        replace the model itself (a sum in its own forward), else None."""
        raise NotImplementedError

    def rebuild(self, model: "nn.Module", items: "list[Any]") -> "nn.Module | None":
        """Give a freshly built model the structure ``items`` leave (values come from the state_dict
        loaded next); the new root as for :meth:`apply`."""
        raise NotImplementedError

    def sites(self, model: "nn.Module", items: "list[Any]") -> "list[SiteSpec]":
        """The sites of ``items`` on ``model`` (before they are applied) for the judge."""
        raise NotImplementedError

    def row(self, item: Any) -> "tuple[str, ...]":
        """``item`` as a row of the report's table of what the pass did (:attr:`columns`)."""
        raise NotImplementedError

    # --------------------------------------------------------------------- defaults

    def on(self, plan: "Plan") -> bool:
        """Whether the pass runs for ``plan`` (its :attr:`option`, as ``plan.options`` has it; the
        workflow that knows where the model goes has resolved a default of None there)."""
        return self.option is None or self.option.value(plan.options)

    def to_row(self, item: Any) -> Any:
        """``item`` as a JSON value of the fused file's record: its fields."""
        return _plain(item)

    def from_row(self, row: Any) -> Any:
        """The item a record's row holds, field by field as :attr:`item` declares them (a malformed
        row raises TypeError, KeyError or ValueError)."""
        return _build(self.item, row)

    def to_json(self, item: Any) -> "dict[str, Any]":
        """``item`` in JSON reports."""
        return _plain(item)

    def left_json(self, left: Any) -> "dict[str, Any]":
        """A refusal in JSON reports."""
        return _plain(left)

    def absorbed(self, item: Any) -> "list[str]":
        """The BatchNorm-like layers ``item`` removes from the model."""
        return [v for f in self.absorbs if isinstance(v := getattr(item, f, None), str) and v]

    def touches(self, item: Any) -> "set[str]":
        """The layers and modules ``item`` rewrites."""
        return {v for f in self.rewrites if isinstance(v := getattr(item, f, None), str) and v}

    def left_row(self, left: Any) -> "tuple[str, str]":
        """A refusal as the report's (where, reason): its first field and its reason."""
        return str(getattr(left, fields(left)[0].name)), str(left.reason)

    def summary(self, plan: "Plan") -> "tuple[str, str] | None":
        """The pass's line in the summary table, or None."""
        return None

    def rows(self, plan: "Plan") -> Rows:
        """What the report shows of this pass's part of ``plan``."""
        return Rows(self.title, self.columns, [self.row(i) for i in plan.of(self.name)], self.left_title,
                    self.left_what, [self.left_row(x) for x in plan.left_by(self.name)], self.summary(plan))


class AffineFold(Pass):
    """A pass whose every item folds one per-channel affine map ``y -> a * y + b`` (a BatchNorm's,
    an affine chain's, a scale's) into the layer ``item.producer``, backward (on its output) or
    forward (on its input), and then takes that map out of the model (:meth:`remove`).  The fold
    and its rebuild are the same for all of them: only where the map comes from and how it leaves
    the forward differ."""

    def affine(self, model: "nn.Module", item: Any) -> "tuple[torch.Tensor, torch.Tensor]":
        """The map's per-channel ``(a, b)`` in float64, read from ``model`` before the rewrite."""
        raise NotImplementedError

    def direction(self, item: Any) -> str:
        """``backward`` (the map reads the layer's output) or ``forward`` (the layer reads the map's)."""
        return getattr(item, "direction", "backward")

    def label(self, item: Any) -> str:
        """What the map is called in messages (the BatchNorm, the call, the scale)."""
        return self.absorbed(item)[0]

    def remove(self, model: "nn.Module", items: "list[Any]", values: bool) -> "nn.Module | None":
        """Take the folded maps out of the model (``values``: after a fold, not a rebuild); the new
        root as for :meth:`Pass.apply`."""
        raise NotImplementedError

    def apply(self, model: "nn.Module", items: "list[Any]") -> "nn.Module | None":
        from ..layers import fold_affine

        for it in items:
            a, b = self.affine(model, it)
            fold_affine(model.get_submodule(it.producer), a, b, self.label(it), self.direction(it))
        return self.remove(model, items, True)

    def rebuild(self, model: "nn.Module", items: "list[Any]") -> "nn.Module | None":
        from ..layers import give_bias

        for it in items:
            give_bias(model.get_submodule(it.producer))
        return self.remove(model, items, False)


def norm_affine(model: "nn.Module", name: str) -> "tuple[torch.Tensor, torch.Tensor]":
    """The eval-mode affine map of the BatchNorm-like module ``name``, in float64."""
    from ...errors import BnfuseError

    norm = model.get_submodule(name)
    rule, why = norm_rule(norm)
    if rule is None:
        raise BnfuseError(f"cannot fold {name}: {why}")
    return affine_from_stats(*rule.stats(norm), name=name)


def by_block(items: "list[Any]", block: "Any" = None) -> "list[tuple[str, list[Any]]]":
    """``items`` grouped by the block whose forward a rewrite edits (``item.block``, or
    ``block(item)``), innermost blocks first and the model's own forward ("") last: an outer block's
    rewrite then sees its children already rewritten."""
    groups: dict[str, list[Any]] = {}
    for it in items:
        groups.setdefault(block(it) if block else it.block, []).append(it)
    return sorted(groups.items(), key=lambda kv: (kv[0] == "", -kv[0].count(".")))


def touched(plan: "Plan", own: str) -> "set[str]":
    """The layers and modules the other passes rewrite in this round: a pass that would rewrite one
    of them again leaves it for the next round, so that each site is judged on its own."""
    out: set[str] = set()
    for p in plan.passes:
        if p.name != own:
            for it in plan.of(p.name):
                out |= p.touches(it)
    return out


def inside(name: str, names: "set[str]") -> bool:
    """Whether the module ``name`` is one of ``names`` or inside one of them."""
    return name in names or any(name.startswith(f"{n}.") for n in names)


def layer_axis(model: "nn.Module", name: str) -> int:
    """The channel axis of layer ``name``'s output: -1 for a Linear (its features), else 1 (a conv, or
    a layer the model does not have: the site is then left out by the table)."""
    try:
        rule, _ = producer_rule(model.get_submodule(name))
    except AttributeError:
        return 1
    return -1 if rule is not None and rule.kind == "linear" else 1


# ----------------------------------------------------------------------------- rows of a record

#: the metadata of a field a record leaves out while it is empty (``field(default=(), metadata=OMIT_EMPTY)``)
OMIT_EMPTY = {"omit_empty": True}


def _plain(value: Any) -> Any:
    """An item as JSON keeps it: a dataclass as an object of its fields (those marked
    :data:`OMIT_EMPTY` only when not empty), tuples as lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(v) for f in fields(value)
                if (v := getattr(value, f.name)) or not f.metadata.get("omit_empty")}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, row: Any) -> Any:
    """An instance of the dataclass ``cls`` from its JSON ``row``, each field as its type declares."""
    if not isinstance(row, dict):
        raise TypeError(f"a {cls.__name__} is recorded as an object, not {row!r}")
    hints = typing.get_type_hints(cls)
    given = {}
    for f in fields(cls):
        if f.name in row:
            given[f.name] = _value(hints[f.name], row[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise KeyError(f"{cls.__name__} row {row!r} has no {f.name!r}")
    return cls(**given)


def _value(tp: Any, v: Any) -> Any:
    """``v`` (JSON) as the type ``tp``: str, int, float, bool, a dataclass, tuples, unions, Any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for a in kinds:  # a value already of one of the types stays it (str | float keeps a name)
            if isinstance(a, type) and not is_dataclass(a) and typing.get_origin(a) is None and isinstance(v, a):
                return v
        return _value(kinds[0], v)
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"expected a list, not {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], x) for x in v)
        if len(args) != len(v):
            raise ValueError(f"expected {len(args)} values, not {v!r}")
        return tuple(_value(a, x) for a, x in zip(args, v))
    if is_dataclass(tp):
        return _build(tp, v)
    if tp in (str, int, float):
        if isinstance(v, (dict, list, tuple)) or v is None or (tp is not str and isinstance(v, str)):
            raise TypeError(f"expected {tp.__name__}, not {v!r}")
        return tp(v)
    if tp is bool:
        if not isinstance(v, bool):
            raise TypeError(f"expected true or false, not {v!r}")
        return v
    raise TypeError(f"cannot read a {tp!r} from a record")
