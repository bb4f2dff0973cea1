"""Apply a fold plan to a model's own module tree, in place.

Producers keep their names and gain a bias if they had none; each folded BatchNorm is replaced
by ``nn.Identity`` (or, for a norm that applies drop and activation after normalising, by a
module that still applies them), so the fused state_dict keeps the original key names: BN keys
vanish and producers gain ``.bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from ....errors import BnfuseError
from ...affine import affine_from_stats, apply_fold_, prepare_fold
from ...patterns import norm_rule, producer_rule
from ...plan import Plan
from .find import Fold

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["apply_plan", "apply_structure"]


def _replacement(norm: "nn.Module", kind: str) -> "nn.Module":
    from torch import nn

    if kind == "identity":
        return nn.Identity()
    if kind == "activation":
        from ...layers import NormActivation

        drop, act = getattr(norm, "drop", nn.Identity()), getattr(norm, "act", nn.Identity())
        if type(drop) is nn.Identity and type(act) is nn.Identity:  # nothing after normalising (apply_act=False)
            return nn.Identity()
        return NormActivation(drop, act)
    raise BnfuseError(f"unknown replacement {kind!r} in the fold plan")


def _aliases(model: "nn.Module") -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def _get(model: "nn.Module", name: str, what: str) -> "nn.Module":
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise BnfuseError(f"the fold plan names {what} {name!r}, which this model does not have") from exc


def _replace_norms(model: "nn.Module", folds: Iterable[Fold], build) -> None:  # noqa: ANN001
    aliases = _aliases(model)
    done: set[int] = set()
    for f in folds:
        norm = _get(model, f.norm, "BatchNorm")
        if id(norm) in done:
            continue
        done.add(id(norm))
        new = build(norm, f.replacement)
        for name in aliases.get(id(norm), [f.norm]):
            model.set_submodule(name, new)
            _skip_in_rewritten_block(model, name, new)


def _skip_in_rewritten_block(model: "nn.Module", name: str, new: "nn.Module") -> None:
    """A BatchNorm folded inside a block an earlier round rewrote (one after a merged sum) leaves that
    block's forward: the ``nn.Identity`` in its place is not called.  Elsewhere it stays in place under
    its name, so the module tree and every index of a ``Sequential`` stay as they were."""
    from torch import fx, nn

    from ...forward import skip_identity_calls

    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, fx.GraphModule) and type(new) is nn.Identity:
        skip_identity_calls(parent)


@dataclass
class _LayerSites:
    """The folds of one layer: the BN after it (folded ``backward`` into it) and the BN before it
    (folded ``forward`` into it),
    each as a float64 (scale, shift)."""

    layer: "nn.Module"
    name: str
    transposed: bool
    backward: "tuple[torch.Tensor, torch.Tensor] | None" = None
    forward: "tuple[torch.Tensor, torch.Tensor] | None" = None


def apply_plan(model: "nn.Module", folds: "Iterable[Fold] | Plan") -> None:
    """Fold every fold of ``folds`` (a list, or a plan's) into ``model`` in place (statistics in
    float64, cast once).

    Every fold is checked first (corrupt statistics, a weight or bias that would overflow its
    dtype) and nothing is written until all of them pass: a :class:`FoldError` leaves the model
    as it was.  Then each weight is rescaled in place, block by block, so folding needs no
    second copy of the weights.  A layer that absorbs a BN before it and one after it gets both.
    """
    import torch

    from ...layers import set_bias

    folds = list(folds.folds if isinstance(folds, Plan) else folds)
    sites: dict[int, _LayerSites] = {}
    for f in folds:
        norm = _get(model, f.norm, "BatchNorm")
        layer = _get(model, f.producer, "layer")
        rule, reason = norm_rule(norm)
        prod, preason = producer_rule(layer)
        if rule is None or prod is None:
            raise BnfuseError(f"cannot fold {f.norm} into {f.producer}: {reason or preason}")
        scale, shift = affine_from_stats(*rule.stats(norm), name=f.norm)
        if f.channels is not None:  # one part of a concatenation: its slice of the channels
            start, stop = f.channels
            if not 0 <= start < stop <= scale.numel():
                raise BnfuseError(
                    f"the fold plan gives {f.producer} channels {start}:{stop} of {f.norm}, "
                    f"which has {scale.numel()}"
                )
            scale, shift = scale[start:stop], shift[start:stop]
        site = sites.setdefault(id(layer), _LayerSites(layer, f.producer, prod.transposed))
        if f.direction not in ("backward", "forward"):
            raise BnfuseError(f"unknown fold direction {f.direction!r} for {f.norm} in the fold plan")
        if getattr(site, f.direction) is not None:
            where = "output" if f.direction == "backward" else "input"
            raise BnfuseError(f"the fold plan folds two BatchNorms into the {where} of {f.producer}")
        setattr(site, f.direction, (scale, shift))
    staged = [
        (s.layer, prepare_fold(s.layer.weight, s.layer.bias, backward=s.backward, forward=s.forward,
                               transposed=s.transposed, groups=getattr(s.layer, "groups", 1), name=s.name))
        for s in sites.values()
    ]
    workspace = None
    with torch.no_grad():
        for layer, fold in staged:
            workspace = apply_fold_(layer.weight, fold, workspace=workspace)
            set_bias(layer, fold.bias)
    _replace_norms(model, folds, _replacement)


def apply_structure(model: "nn.Module", folds: Iterable[Fold]) -> None:
    """Give an unfused model the fused structure (for loading a fused state_dict strictly).

    Each folded norm is replaced as in :func:`apply_plan` and each producer gains a zero bias;
    the values come from the state_dict loaded afterwards.
    """
    from ...layers import give_bias

    folds = list(folds)
    for f in folds:
        give_bias(_get(model, f.producer, "layer"))
    _replace_norms(model, folds, _replacement)
