"""What the original's own run says about a site: how often its modules ran, and what read their outputs.

A site's float64 check (:mod:`.sites`) proves that the fused layer computes what the site's chain
computed, on the activation that reached it.  It cannot see what the chain's *removed* values were
for elsewhere: a conv whose output a residual also reads, a BatchNorm after only one of a layer's two
calls, a Linear the model also calls on another input.  Those are data-flow facts, and a pass that
misreads the data flow would describe its mistake to the judge as a correct chain.  So the judge
watches one plain run of the original itself, with its own hooks and its own ``TorchFunctionMode``
(it shares the names of ops with the engine's recorder, :mod:`bnfuse_cli.engine.ops`, not its reading
of the model), and holds each site to two facts of that run:

* the layer the site keeps (the one its fused side runs) **ran no more often than anything else the
  site rewrites** (a module that holds tensors, or a block whose own code the site replays): a layer
  called twice with its BatchNorm after one call fails, one BatchNorm after two layers does not; and
  the branches of a sum or a concatenation ran equally often;
* every value the chain passes on inside the site (a module's output that is not the site's result,
  every branch of a sum) was **read by nothing but the site's next module** where that module read it
  itself, and otherwise **once** per call (on its way: a flatten, a slice, the sum, the block's own
  code).  A read is an operation that returned a tensor (an update in place reads the value it
  replaces, and what reads the updated tensor reads another value), or the model's caller taking an
  output; shape queries read nothing.

What it cannot see it does not claim: values that are not a module's output (a ``cat`` inside a
chain) are followed by the passes' guards and by the end-to-end check.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ..engine.ops import SELF_ONLY, VALUE_FREE, op_name
from ..engine.record import tensors_in

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FlowNeeds", "FlowWatch", "flow_needs"]


@dataclass(frozen=True)
class FlowNeeds:
    """What a site assumes of the original's run.  ``kept``: the modules its fused side runs (one the
    original does not have is a copy made for the site, which leaves the original's values where they
    were: ``once`` then assumes nothing); ``rewritten``: what else it rewrites, each of which ran at least
    as often as each of ``kept``; ``parallel``: branches that ran equally often; ``once``: (module, the
    site's next module or ""), each output of the module read by nothing but that next module where it
    read the output itself, or once on its way."""

    kept: "tuple[str, ...]"
    rewritten: "tuple[str, ...]"
    parallel: "tuple[str, ...]" = ()
    once: "tuple[tuple[str, str], ...]" = ()

    @property
    def modules(self) -> "set[str]":
        return {*self.kept, *self.rewritten, *self.parallel, *(n for pair in self.once for n in pair if n)}


def flow_needs(spec: Any) -> FlowNeeds:
    """What a site (:class:`~bnfuse_cli.engine.steps.SiteSpec`) assumes: the modules its original chain
    runs, and those whose output it passes on: every step's module but the chain's last; in a sum, every
    branch's (the sum is their only reader); in a concatenation, each part's but its last (a part's
    result stays readable as a slice of the wider layer)."""
    from ..engine.steps import Cat, Forward, Norm, RunLayer, RunModule, Sum

    runs: list[str] = []
    parallel: list[str] = []
    once: list[tuple[str, str]] = []

    def module(step: Any) -> str:
        return step.name if isinstance(step, (RunLayer, Norm, RunModule)) else ""

    def walk(chain: "tuple[Any, ...]", keep_last: bool) -> None:
        for i, step in enumerate(chain):
            following = module(chain[i + 1]) if i + 1 < len(chain) else ""
            if isinstance(step, (Sum, Cat)):
                parallel.extend(m for sub in step.chains if sub and (m := module(sub[0])))
                for sub in step.chains:
                    walk(sub, isinstance(step, Cat))
            elif isinstance(step, Forward):
                runs.append(step.block)
            elif module(step):
                runs.append(step.name)
                if not (i == len(chain) - 1 and keep_last):
                    once.append((step.name, following))

    walk(tuple(spec.original), True)
    kept = tuple(dict.fromkeys(m for s in spec.fused if (m := module(s))))
    return FlowNeeds(kept, tuple(n for n in dict.fromkeys(runs) if n not in kept), tuple(dict.fromkeys(parallel)),
                     tuple(dict.fromkeys(once)))


def _has(model: "nn.Module", name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _holds_tensors(module: "nn.Module") -> bool:
    import torch

    return any(True for _ in module.parameters()) or any(True for _ in module.buffers()) or any(
        isinstance(v, torch.Tensor) for v in vars(module).values())


class _Run:
    """The bookkeeping of one watched run: calls per module, the modules running now, and for each call
    of a module of a ``once`` the reads of its output by anything but its next module."""

    def __init__(self, nexts: "dict[str, set[str]]") -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self.nexts = nexts
        self.calls: Counter[str] = Counter()
        self.running: list[str] = []
        self.produced: Any = WeakIdKeyDictionary()  # tensor -> the counters of the calls that returned it
        self.counters: list[list[Any]] = []

    def before(self, name: str) -> Any:
        def hook(mod: Any, args: Any) -> None:
            self.running.append(name)
        return hook

    def after(self, name: str) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            if self.running and self.running[-1] == name:
                self.running.pop()
            self.calls[name] += 1
            if name in self.nexts:
                counter: list[Any] = [name, 0, 0]  # module, reads by others, reads by its next module
                self.counters.append(counter)
                for t in tensors_in(out):
                    self.produced.setdefault(t, []).append(counter)
        return hook

    def read(self, inputs: "list[Any]") -> None:
        seen: set[int] = set()
        for t in inputs:
            for c in self.produced.get(t, ()):
                if id(c) not in seen:
                    seen.add(id(c))
                    c[2 if any(n in self.running for n in self.nexts[c[0]] if n) else 1] += 1

    def returned(self, mod: Any, args: Any, out: Any) -> None:  # the model's output is read by its caller
        if self.produced:
            self.read(tensors_in(out))

    def op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """An operation ran: it read what it was given (a query, a shape, reads nothing); a result that is
        one of its inputs was updated in place and holds another value now."""
        if not self.produced:
            return
        results = tensors_in(out)
        if not results:
            return
        inputs = tensors_in((args, kwargs))
        name = op_name(func)
        self.read([] if name in VALUE_FREE else tensors_in(args[:1]) if name in SELF_ONLY else inputs)
        for r in results:
            if any(r is t for t in inputs):
                self.produced.pop(r, None)


class FlowWatch:
    """Watches one plain run of a model for the sites' :class:`FlowNeeds`; :meth:`problem` then says
    what a site assumed that the run did not do."""

    def __init__(self, needs: "dict[str, FlowNeeds]") -> None:
        self.needs = needs
        #: calls of each watched module in the run watched
        self.calls: Counter[str] = Counter()
        #: per module of a ``once``: the most reads of one call's output beyond those the site accounts for
        self.reads: dict[str, int] = {}
        #: modules that hold no tensors (nothing a rewrite changes): their calls are not compared
        self.stateless: set[str] = set()
        #: sites whose fused side runs a copy the original does not have
        self.copies: set[str] = set()
        #: the modules watched (a site made in a later round may name one the original does not have)
        self.hooked: set[str] = set()
        self.watched = False

    @contextlib.contextmanager
    def watch(self, model: "nn.Module") -> Iterator[None]:
        """Count calls and reads while ``model`` runs inside this block (one plain run)."""
        from torch.overrides import TorchFunctionMode

        names = {n for need in self.needs.values() for n in need.modules}
        if not names:
            yield
            return
        nexts: dict[str, set[str]] = {}
        for need in self.needs.values():
            for name, following in need.once:
                nexts.setdefault(name, set()).add(following)
        run = _Run(nexts)

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                run.op(func, args, kwargs, out)
                return out

        self.copies = {key for key, need in self.needs.items() if not all(_has(model, n) for n in need.kept)}
        handles = [model.register_forward_hook(run.returned)]
        self.hooked, self.stateless = {n for n in names if _has(model, n)}, set()
        for name in sorted(self.hooked):
            module = model.get_submodule(name)
            if not _holds_tensors(module):
                self.stateless.add(name)
            handles += [module.register_forward_pre_hook(run.before(name)),
                        module.register_forward_hook(run.after(name))]
        try:
            with _Mode():
                yield
        finally:
            for h in handles:
                h.remove()
            self.calls = run.calls
            # reads beyond the one a value on its way to the next module may have (a flatten, a slice), or
            # beyond none where the next module read it itself
            self.reads = {n: max((c[1] - (0 if c[2] else 1) for c in run.counters if c[0] == n), default=0)
                          for n in nexts}
            self.watched = True

    def problem(self, key: str) -> "str | None":
        """What site ``key`` assumed that the watched run did not do, in words; None when nothing."""
        need = self.needs.get(key)
        if need is None or not self.watched:
            return None

        def said(names: "tuple[str, ...]") -> str:
            return ", ".join(f"{n or 'the model'} {self.calls[n]} time{'s' if self.calls[n] != 1 else ''}"
                             for n in names)

        seen = self.hooked - self.stateless
        for kept in need.kept:
            fewer = [n for n in need.rewritten if n in seen and self.calls[n] < self.calls[kept]]
            if fewer and kept in seen:
                return (f"the original ran {said((kept, *fewer))}: {kept} also runs where the site does not "
                        "(its rewrite would change those calls too)")
        if len({self.calls[n] for n in need.parallel if n in self.hooked}) > 1:
            return f"the original ran {said(need.parallel)}: the branches of the site ran unequally often"
        for name, _ in () if key in self.copies else need.once:
            if (n := self.reads.get(name, 0)) > 0:
                return (f"the original read {name}'s output {n} more time{'s' if n > 1 else ''} in one call than on "
                        "its way through the site: the site removes a value something else reads too")
        return None
