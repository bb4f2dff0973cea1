"""The runtimes ``bench`` races in (``--runtime``): the modules themselves (``eager``), ``torch.export``
programs run as ``ep.module()`` (``export``), or onnxruntime sessions (``onnxruntime``); each
program exported through the files layer (:mod:`bnfuse_cli.files.export`), the same code as
``convert -o .pt2/.onnx``, and the options each runtime accepts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..precision import resolve_device
from .timing import compiled

if TYPE_CHECKING:
    import torch

    from ..files.export import ExportError
    from .fuse import FuseResult

__all__ = ["RUNTIMES", "ORT_LEVEL", "ort_op_counts", "programs", "check_runtime"]

#: what both models run in (``--runtime``): the modules, torch.export programs, or onnxruntime sessions
RUNTIMES: tuple[str, ...] = ("eager", "export", "onnxruntime")

#: onnxruntime's graph optimisation level for both sessions: its highest (ORT_ENABLE_ALL)
ORT_LEVEL = "enable_all"

def ort_op_counts(path: Any) -> dict[str, Any]:
    """The BatchNorm and convolution nodes of an ONNX graph (a file, or a loaded model: one onnxruntime saved
    after optimising):
    ``bn`` (BatchNormalization), ``conv`` (every conv-like op: Conv, ConvTranspose, and onnxruntime's
    own FusedConv and NCHWc Conv), ``nodes`` (all), and ``conv_ops`` by op type and domain."""
    from collections import Counter

    import onnx

    proto = path if hasattr(path, "graph") else onnx.load(str(path), load_external_data=False)
    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in proto.graph.node)
    conv = {f"{op}" + ("" if dom == "ai.onnx" else f" ({dom})"): c for (dom, op), c in sorted(ops.items())
            if "conv" in op.lower()}
    return {"bn": sum(c for (_, op), c in ops.items() if "batchnorm" in op.lower()),
            "conv": sum(conv.values()), "nodes": len(proto.graph.node), "conv_ops": conv}


def _export_failed(which: str, source: str, st: Any, exc: Exception) -> "ExportError":
    from ..files.export import ExportError

    cause = exc.__cause__ or exc
    first = " ".join((str(cause).strip().splitlines() or ["no details"])[0].split())
    return ExportError(f"--runtime {st.runtime}: the {which} model of {source} cannot be exported "
                       f"({type(cause).__name__}: {first[:400]}); bench it with --runtime eager")


def programs(prep: Any, result: "FuseResult", args: tuple[Any, ...], st: Any
              ) -> "tuple[Any, Any, dict[str, Any] | None]":
    """Stage 4: what is raced in ``st.runtime``: (original runner, fused runner, per-graph op counts
    after onnxruntime's optimisation, None for other runtimes).  Programs are exported through the
    files layer (:mod:`bnfuse_cli.files.export`), the same code as ``convert -o .pt2/.onnx``."""
    import torch

    from ..files.export import ExportError, export_program
    from ..files.onnxfile import export_onnx, open_exported

    models = (("original", prep.original), ("fused", result.model))
    if st.runtime == "eager":
        if st.compile:
            return compiled(prep.original, prep.source), compiled(result.model, prep.source), None
        return prep.original, result.model, None
    if st.runtime == "export":
        runners = []
        for which, model in models:
            try:
                ep, _ = export_program(model, args)
            except ExportError as exc:
                raise _export_failed(which, prep.source, st, exc) from exc
            runners.append(ep.module())
        prep.notes.append("both models exported with torch.export (batch and spatial dimensions Dim.AUTO) and "
                          "run as ep.module()")
        return runners[0], runners[1], None
    threads = st.threads or torch.get_num_threads()
    runners, counts = [], {}
    for which, model in models:  # each session takes its model as bytes: no file (one above 2 GiB: a private folder)
        try:
            data, _ = export_onnx(model, args, {})
        except ExportError as exc:
            raise _export_failed(which, prep.source, st, exc) from exc
        runner, optimized = open_exported(data, f"the {which} model of {prep.source}", level=ORT_LEVEL,
                                          threads=threads, spinning=False)
        runners.append(runner)
        counts[which] = ort_op_counts(optimized)
    prep.notes.append(f"both models exported to ONNX and run by onnxruntime with ORT_{ORT_LEVEL.upper()}, "
                      f"{threads} intra-op thread{'' if threads == 1 else 's'}, {runners[0].provider}, idle threads not spinning (a spinning "
                      "session's threads would slow the other one down while it runs)")
    return runners[0], runners[1], counts


def check_runtime(runtime: str, *, device: str, dtype: "torch.dtype", autocast: "str | None",
                   channels_last: bool, compile: bool) -> "torch.device":
    """The device to bench on, once ``runtime`` is known and fits the other options (a
    :class:`UsageError` otherwise; an ``ExtraMissing`` naming the install command for onnxruntime)."""
    import torch

    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime {runtime!r}: use {', '.join(RUNTIMES[:-1])} or {RUNTIMES[-1]}")
    if runtime == "eager":
        return resolve_device(device)
    if compile:
        raise UsageError(f"--compile applies to --runtime eager, not {runtime}")
    if autocast is not None:
        raise UsageError(f"--autocast applies to --runtime eager: a {runtime} program runs in the dtype it was "
                         "exported in; use --dtype")
    if runtime == "export":
        return resolve_device(device)
    from ..files.onnxfile import require_onnx

    require_onnx("--runtime onnxruntime", "use --runtime eager or export")
    if dtype != torch.float32:
        raise UsageError(f"--runtime onnxruntime runs float32 graphs; --dtype {str(dtype).replace('torch.', '')} "
                         "applies to --runtime eager or export")
    if channels_last:
        raise UsageError("--channels-last applies to --runtime eager or export: onnxruntime chooses its own layout")
    if device != "auto" and resolve_device(device).type != "cpu":
        raise UsageError(f"--runtime onnxruntime runs on the CPU (its CPU execution provider); use --device cpu, "
                         f"not {device}")
    return torch.device("cpu")
