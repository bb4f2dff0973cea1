"""``verify``: prove that a fused model computes what the original computes.

Both models are loaded in any form bnfuse reads (a model name, a state_dict with ``arch``, a
nested training checkpoint, a pickled module with ``allow_pickle``, TorchScript, .safetensors,
bnfuse's own outputs rebuilt from their metadata), and judged by :mod:`bnfuse_cli.checks` on
the device, dtype and autocast they will be deployed with: every fold site named in the fused
file's metadata on the activation that reaches it (float64), and the outputs on seeded random
inputs and, optionally, on a file of real inputs with labels, against the original in float64.
The report adds the cosine similarity, top-1 agreement for classifier logits, accuracy on
labelled data, and the structure: which BatchNorm layers are gone and both parameter counts.
Nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from ..checks import Magnitude, OutputCheck, SelectionProbe, SiteCheck, SiteProbe, Tolerance, Verdict, judge_post_processing
from .options import JudgeOptions, split_call
from .source import SourceOptions, count_tensors
from ..errors import BnfuseError, UsageError
from ..inputs import InputSpec, as_args, input_spec, make_input, model_dtype
from ..files.load import Source, check_arch, load_source
from ..files.models import own_init_only
from ..files.data import read_data
from ..precision import autocast, check_autocast, parse_dtype, precision_flags, resolve_device
from .verify_report import DataResult, Structure, VerifyReport

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["VerifyReport", "JudgeOptions", "DataResult", "Structure", "verify"]

# ----------------------------------------------------------------------------- verify


def _norm_names(model: "nn.Module") -> list[str]:
    from ..engine.patterns import is_norm_like

    return [name for name, m in model.named_modules() if is_norm_like(m)]


def _structure(orig: "nn.Module", fused: "nn.Module") -> Structure:
    po, bo = count_tensors(orig)
    pf, bf = count_tensors(fused)
    return Structure(_norm_names(orig), _norm_names(fused), po, pf, bo, bf)


def _pick_spec(orig: Source, fused: Source, input_shape: Any, data: "torch.Tensor | None") -> InputSpec:
    if input_shape is None and data is not None:
        return InputSpec((min(4, int(data.shape[0])), *map(int, data.shape[1:])))
    # a bnfuse output records the input its conversion was checked with
    return input_spec(fused if fused.meta is not None and fused.meta.input else orig, input_shape)


def _lower_precision(*dtypes: Any) -> Any:
    import torch

    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    known = [d for d in dtypes if d in order]
    return min(known, key=order.index) if known else torch.float32


def _site_checks(src_o: Source, src_f: Source, x: Any, name: str) -> tuple[list[SiteCheck], list[str]]:
    """Every site the fused file names (each pass's items of every round), checked on the activation
    that reaches it in the original (one run of the original in its own dtype and device)."""
    from ..engine.passes import PASSES, site_specs

    if src_f.meta is None:
        return [], ["the fused file names no fold sites (not a bnfuse output): checked on outputs only"]
    specs, missing = site_specs(src_o.model, {p.name: src_f.meta.all_of(p.name) for p in PASSES})
    recorded = src_f.meta.arch
    if missing and recorded is not None and src_o.arch is not None and recorded != src_o.arch:
        given = "" if name == src_o.arch else f" ({name})"
        raise UsageError(
            f"{src_f.path} records that it was converted from {recorded}, but the original is {src_o.arch}{given}: "
            f"{missing} of the sites it records name layers {src_o.arch} does not have. Compare the fused file "
            f"with the original it was converted from ({recorded})"
        )
    notes = []
    if missing:
        notes.append(f"{missing} site(s) in the fused file's metadata name layers the original does not have "
                     "(made by an earlier conversion?): not checked by site")
    probe = SiteProbe()
    probe.use(specs)
    # a layer changed in several rounds (a BatchNorm folded into a merged conv) has no one site to
    # compare on the original: it is judged end to end
    layers = [spec.layer for spec in specs]
    several = sorted({n for n in layers if layers.count(n) > 1})
    if several:
        probe.use([s.spec for s in probe.sites.values() if s.spec.layer not in several])
        notes.append(f"{len(several)} layer(s) changed in more than one round ({', '.join(several[:3])}"
                     f"{', ...' if len(several) > 3 else ''}): checked end to end only")
    with probe.hooks(src_o.model):
        _run(src_o.model, x, "original", name)
    probe.reference(src_o.model)
    if src_f.kind != "program":
        return probe.check(src_f.model), notes
    mapped, unmapped = _program_layers(src_o, src_f)
    sites = probe.check(mapped)
    for s in sites:
        if s.layer in unmapped:
            s.skipped, s.rel_error = f"its weights are not in {src_f.path} under its name (checked end to end only)", \
                math.nan
    notes.append(f"{sum(s.skipped is None for s in sites)} of {len(sites)} fold site(s) checked on the weights "
                 f"{src_f.path} holds under their layer names; the outputs come from its program as exported")
    return sites, notes


def _program_layers(src_o: Source, src_f: Source) -> "tuple[nn.Module, set[str]]":
    """The fused structure rebuilt from the original (its recorded rounds) holding an exported program's
    weights, mapped by name: (that module, the layers whose weights the program lacks)."""
    import copy

    from ..engine.passes import rebuild
    from ..files.export import program_weights

    mapped = copy.deepcopy(src_o.model)
    mapped = rebuild(mapped, src_f.meta.steps)
    weights = program_weights(src_f.model)
    own = mapped.state_dict()
    found = type(own)((k, v) for k, v in weights.items() if k in own)
    found._metadata = getattr(own, "_metadata", None)  # the modules' versions (MNASNet refuses a load without)
    keys = mapped.load_state_dict(found, strict=False)
    unmapped = {k.rsplit(".", 1)[0] for k in keys.missing_keys}
    return mapped, unmapped


def _float64_copy(model: "nn.Module", device: Any) -> "nn.Module | None":
    """The original in float64 on ``device``: the exact reference (None if it cannot be made)."""
    import copy

    import torch

    try:
        ref = copy.deepcopy(model).to(device=device, dtype=torch.float64)
        for m in ref.modules():  # tensors a module keeps as plain attributes, which ``.to`` leaves as they are
            for k, v in list(vars(m).items()):
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    setattr(m, k, v.to(device=device, dtype=torch.float64))
        return ref
    except Exception:  # a module that cannot be copied or cast: judged against the original itself
        return None


def _run(model: "nn.Module", x: Any, what: str, name: str, device: Any = "cpu", amp: "str | None" = None) -> Any:
    """``model(x)`` without autograd (under ``amp`` autocast); a failure names the model and input."""
    import torch

    try:
        with torch.no_grad(), autocast(device, amp):
            return model(*as_args(x))
    except Exception as exc:  # wrong input shape for this model, most often
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        shape = tuple(x[0].shape) if isinstance(x, (list, tuple)) else tuple(x.shape)
        raise BnfuseError(
            f"running the {what} model ({name}) on an input of shape {shape} failed: {type(exc).__name__}: "
            f"{first}. Pass --input-shape with the shape the model takes"
        ) from exc


class _Runner:
    """Runs the reference, the original and the fused model on the same inputs, as deployed."""

    def __init__(self, ref: "nn.Module | None", orig: "nn.Module", fused: "nn.Module", *, dtypes: tuple[Any, Any],
                 device: Any, autocast_dtype: "str | None", names: tuple[str, str]) -> None:
        self.ref, self.orig, self.fused = ref, orig, fused
        self.dtypes, self.device, self.autocast, self.names = dtypes, device, autocast_dtype, names

    def _call(self, model: "nn.Module", x: Any, what: str, *, amp: bool = True) -> "tuple[Any, list[Any]]":
        """The model's output, and the tensors that fed its post-processing (none for most models)."""
        name = self.names[1] if what == "fused" else self.names[0]
        with SelectionProbe() as probe:
            out = _run(model, x, what, name, self.device, self.autocast if amp else None)
        return out, probe.kept

    def add(self, check: OutputCheck, make: Any, labels: Any = None, pre: "OutputCheck | None" = None) -> None:
        """``make(dtype)`` gives a fresh input (a model may change its input in place); ``pre`` judges
        the tensors that feed post-processing, where both models have them.  The reference run's
        rounding floor (:class:`Magnitude`) is the original's own error where nothing is more precise."""
        import torch

        seen = Magnitude()
        with seen.hooks(self.orig) if self.ref is None else contextlib.nullcontext():
            orig, o_pre = self._call(self.orig, make(self.dtypes[0]), "original")
        fused, f_pre = self._call(self.fused, make(self.dtypes[1]), "fused")
        if self.ref is None:
            check.add(orig, fused, labels=labels, floor=seen.floor(self.dtypes[0]))
            if pre is not None and o_pre and f_pre:
                pre.add(o_pre, f_pre)
        else:
            with seen.hooks(self.ref):
                ref, r_pre = self._call(self.ref, make(torch.float64), "original (float64)", amp=False)
            check.add(ref, fused, orig, labels=labels, floor=seen.floor(torch.float64))
            if pre is not None and r_pre and f_pre:
                pre.add(r_pre, f_pre, o_pre)


def _data_check(runner: _Runner, inputs: "torch.Tensor", labels: "torch.Tensor | None", batch_size: int,
                device: Any, outputs: "dict[str, OutputCheck]", check: OutputCheck) -> None:
    """The models on ``--data``, ``batch_size`` inputs at a time: ``outputs["data"]``, and the tensors
    that feed post-processing where the models have any."""
    pre = OutputCheck(check.tol, reference=check.reference)
    outputs["data"] = check
    for start in range(0, int(inputs.shape[0]), batch_size):
        chunk = inputs[start:start + batch_size]
        lab = None if labels is None else labels[start:start + batch_size]
        runner.add(check, lambda dt, c=chunk: _cast(c, dt, device), labels=lab, pre=pre)
    judge_post_processing(outputs, "data", pre, label="data, before post-processing")


def _validate(samples: int, data: Any, batch_size: int, device: str, dtype: "str | None",
              autocast_dtype: "str | None") -> tuple[Any, Any, "str | None"]:
    """Every option checked before anything is loaded (the source options were checked when their
    :class:`SourceOptions` was made)."""
    if samples < 0 or (samples == 0 and data is None):
        raise UsageError(f"--samples {samples}: give at least 1 random sample, or --data with real inputs")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give a positive number of inputs per batch")
    return resolve_device(device), None if dtype is None else parse_dtype(dtype), check_autocast(autocast_dtype)


def verify(orig: "str | os.PathLike[str]", fused: "str | os.PathLike[str]", options: "JudgeOptions | None" = None,
           source_options: "SourceOptions | None" = None, **keywords: Any) -> VerifyReport:
    """Judge ``fused`` against ``orig`` on seeded random inputs and, with real data, on those too.

    ``options`` (:class:`JudgeOptions`): ``samples`` seeded random inputs, ``data`` (a tensor file
    of real inputs, with labels or not) in batches of ``batch_size``; both models on ``device``
    (cpu, cuda, cuda:N, auto), in ``dtype`` (float32, float16, bfloat16; default: each model's
    own) and under ``autocast`` (float16 or bfloat16), as they will be deployed.
    ``source_options`` (:class:`SourceOptions`) say how both are loaded, and its ``seed`` draws the
    first random input.  The original also runs in float64 as the exact reference, so each output
    may differ from it by ``atol + rtol * max|ref|`` plus a few times the original's own error
    (``rtol``/``atol`` default by dtype: :data:`bnfuse_cli.checks.TOLERANCES`).  Every fold site
    named in the fused file's record is checked on the activation that reaches it.
    ``SourceOptions.arch`` is used for a file that holds only a state_dict (a bnfuse output brings its
    own; without it, the original takes the architecture the fused file records, and the report says so
    in ``arch_from``; an ``arch`` that disagrees with that record is a :class:`UsageError`);
    ``SourceOptions.key`` picks the original's weights in a checkpoint that holds several.  The report's ``ok`` is the
    verdict; a model that cannot be loaded or run raises a :class:`BnfuseError`.
    """
    import torch

    judge, opts = split_call(JudgeOptions, options, source_options, keywords, "bnfuse_cli.verify")
    samples, rtol, atol, data, batch_size, device, dtype, autocast = (getattr(judge, f.name) for f in fields(judge))
    seed = opts.seed
    dev, want_dtype, amp = _validate(samples, data, batch_size, device, dtype, autocast)
    t0 = time.perf_counter()
    inputs, labels = read_data(data, allow_pickle=opts.allow_pickle) if data is not None else (None, None)
    src_o, src_f, init_note = _load_pair(orig, fused, opts, device=device)
    model_o, model_f = src_o.model, src_f.model
    spec = _pick_spec(src_o, src_f, opts.input_shape, inputs)
    structure = _structure(model_o, model_f)
    t1 = time.perf_counter()

    native, native_dev = model_dtype(model_o)
    first = _cast(inputs[:1], native, native_dev) if inputs is not None else \
        make_input(spec, dtype=native, device=native_dev, seed=seed)
    sites, notes = _site_checks(src_o, src_f, first, str(orig))
    ref_model = _float64_copy(model_o, dev)
    for m in (model_o, model_f):
        m.to(device=dev, dtype=want_dtype) if want_dtype is not None else m.to(device=dev)
    dtypes = (model_dtype(model_o)[0], model_dtype(model_f)[0])
    runtime = _lower_precision(*dtypes) if amp is None else getattr(torch, amp)
    tol = Tolerance.for_dtype(runtime, rtol, atol)
    runner = _Runner(ref_model, model_o, model_f, dtypes=dtypes, device=dev, autocast_dtype=amp,
                     names=(str(orig), str(fused)))
    reference = "float64" if ref_model is not None else "original"
    outputs: dict[str, OutputCheck] = {}
    if samples:
        check = outputs["random inputs"] = OutputCheck(tol, reference=reference)
        pre = OutputCheck(tol, reference=reference)
        for i in range(samples):
            runner.add(check, lambda dt, i=i: make_input(spec, dtype=dt, device=dev, seed=seed + i), pre=pre)
        judge_post_processing(outputs, "random inputs", pre)
    t2 = time.perf_counter()

    data_result = None
    if inputs is not None:
        _data_check(runner, inputs, labels, batch_size, dev, outputs, OutputCheck(tol, reference=reference))
        data_result = DataResult(path=str(data), count=int(inputs.shape[0]), check=outputs["data"])
    t3 = time.perf_counter()
    del runner
    if ref_model is None:
        notes.append("the original could not be copied to float64: judged against its own output")
    del ref_model

    verdict = Verdict(
        tol, outputs, sites, precision_flags(dev, amp, runtime),
        basis=(f"the original in float64 on {dev}" if reference == "float64" else "the original's own output")
        + f"; both models in {str(runtime).replace('torch.', '')}" + (f" under autocast {amp}" if amp else ""),
    )
    return VerifyReport(
        orig=str(orig), fused=str(fused), orig_kind=src_o.kind, fused_kind=src_f.kind,
        arch=src_o.arch, arch_from=src_o.arch_from, fused_arch=src_f.arch, input=spec, dtype=str(runtime).replace("torch.", ""),
        device=str(dev), autocast=amp, samples=samples, seed=seed, verdict=verdict,
        structure=structure, data=data_result,
        notes=_notes(src_o, src_f, structure, outputs, labels, data_result) + init_note + notes,
        seconds={"load": t1 - t0, "samples": t2 - t1, "data": t3 - t2, "total": time.perf_counter() - t0},
    )


def _load_pair(orig: Any, fused: Any, opts: SourceOptions, *, device: str) -> "tuple[Source, Source, list[str]]":
    """The fused file (a program opened in its runtime on ``device``), then the original: a file that
    holds only a state_dict in the architecture the fused file records (when ``arch`` is not given), a
    random one built from the seed the fused file records; and the notes that say so.  ``key`` applies
    to the original only; an ``arch`` that disagrees with the fused file's record is refused."""
    src_f = load_source(fused, arch=opts.arch, weights=opts.weights, allow_pickle=opts.allow_pickle, device=device,
                        programs=True)
    check_arch(opts.arch, src_f.meta, src_f.path)
    init_seed, why = _init_seed(orig, opts.weights, src_f, opts.seed)
    src_o = load_source(orig, arch=opts.arch, weights=opts.weights, allow_pickle=opts.allow_pickle, key=opts.key,
                        seed=init_seed, record=src_f)
    notes = [] if src_o.arch_from is None else [f"architecture: {src_o.arch}, from {src_o.arch_from}"]
    if src_o.seed is not None:
        how = "--weights none" if opts.weights.strip().lower() == "none" else "its own initialisation"
        notes.append(f"original built with random weights ({how}) from seed {src_o.seed}"
                     + (f": {why[0]}" if why else ""))
    return src_o, src_f, notes


def _init_seed(orig: Any, weights: str, src_f: Source, seed: int) -> "tuple[int, list[str]]":
    """The seed to build a randomly initialised original from: the one the fused file records
    when it came from the same name with random weights (``none``, or ``default`` for a name that
    has only its own initialisation), else ``seed``; and a note saying so."""
    meta = src_f.meta
    w = weights.strip().lower()
    random = w == "none" or (w == "default" and own_init_only(str(orig)))
    if not random or meta is None or meta.seed is None or meta.arch != str(orig):
        return seed, []
    return meta.seed, [f"the seed {src_f.path} records for its conversion of {orig}"]


def _cast(x: "torch.Tensor", dtype: Any, device: Any) -> "torch.Tensor":
    """A private copy in the model's dtype; integer inputs (token ids) keep their dtype."""
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype, copy=True)


def _notes(src_o: Source, src_f: Source, st: Structure, outputs: dict[str, OutputCheck], labels: Any,
           data: "DataResult | None") -> list[str]:
    notes = [f"original: {n}" for n in src_o.notes] + [f"fused: {n}" for n in src_f.notes]
    if not st.removed:
        notes.append(
            f"the fused model still has all {len(st.bn_orig)} BatchNorm layers of the original: nothing was "
            "folded (is the second file the fused one?)" if st.bn_orig else
            "the original model has no BatchNorm layers"
        )
    added = [n for n in st.bn_fused if n not in set(st.bn_orig)]
    if added:
        notes.append(f"the fused model has BatchNorm layers the original lacks: {', '.join(added[:5])}")
    recorded = {f.norm for f in src_f.meta.folds} if src_f.meta is not None else set()
    kept = sorted(recorded & set(st.bn_fused))
    if kept:
        notes.append(f"the fused file's metadata says these were folded, yet they are still BatchNorm: {', '.join(kept[:5])}")
    both = sum(c.nonfinite_both for c in outputs.values())
    if both:
        notes.append(f"{both} output values are NaN or infinite in both models (compared as equal)")
    if data is not None and labels is not None and data.accuracy_orig is None:
        notes.append("the models do not return classifier logits (N, classes): no accuracy was computed")
    return notes
