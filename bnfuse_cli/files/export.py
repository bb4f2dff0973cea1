"""Fused models as programs that run without bnfuse or the model's code: ``torch.export`` (``.pt2``)
and ONNX (``.onnx``, the ``onnx`` extra, run by onnxruntime).

The model is exported with ``torch.export.export`` on the check input (made batch 2: an example of
batch 1 would fix the batch size), the batch and spatial dimensions marked ``Dim.AUTO`` so that
each stays dynamic where the model allows it; which ones did is read back from the exported
graph and said.  bnfuse's record travels inside the archive (``extra_files``), and the file loads
with ``torch.export.load(path).module()`` in a process that has neither bnfuse nor the model's code.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import OutputError, UsageError
from .formats import META_KEY, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ExportError", "ExtraMissing", "export_program", "load_program", "program_bytes", "dynamic_dims",
           "check_program", "pt2_bytes", "require_onnx", "onnx_bytes", "check_onnx", "open_onnx", "open_pt2", "program_weights",
           "session_options", "ORT_LEVELS"]

#: the archive entry bnfuse's record is stored under
META_FILE = f"{META_KEY}.json"


class ExportError(OutputError):
    """The model cannot be exported (data-dependent control flow, an unsupported op)."""


class ExtraMissing(UsageError):
    """A format needs an optional extra that is not installed."""


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """The exporter's log lines (and the partial graphs it prints to stderr on failure) only with ``verbose``."""
    if verbose:
        yield
        return
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _batch_of_two(args: tuple[Any, ...]) -> "tuple[tuple[Any, ...], bool]":
    """``args`` with every tensor's first dimension made 2 (repeating the first sample), and whether
    that was possible (all tensors batched alike); an example of batch 1 would make the batch static."""
    import torch
    from torch.utils._pytree import tree_leaves, tree_map_only

    tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 for t in tensors) or len({t.shape[0] for t in tensors}) != 1 \
            or not all(isinstance(a, torch.Tensor) for a in args):
        return args, False
    return tree_map_only(torch.Tensor, lambda t: t[:1].expand(2, *t.shape[1:]).contiguous(), args), True


def _auto_dims(example: tuple[Any, ...]) -> tuple[dict[int, Any], ...]:
    """Batch and spatial dimensions as ``Dim.AUTO`` (each stays dynamic where the model allows it);
    the channel (feature) dimension 1 static, as the weights fix it."""
    from torch.export import Dim

    return tuple({d: Dim.AUTO for d in range(a.dim()) if d != 1} for a in example)


def export_program(model: "nn.Module", args: tuple[Any, ...], *, verbose: bool = False
                   ) -> "tuple[torch.export.ExportedProgram, list[str]]":
    """``model`` exported with ``torch.export`` on ``args``: (the program, notes on its dynamic dimensions).
    An :class:`ExportError` with the exporter's reason, in one paragraph, when it cannot be exported."""
    import torch
    example, batched = _batch_of_two(args)
    shapes = None
    if batched:
        shapes = _auto_dims(example)
    try:
        with quiet(verbose), torch.no_grad():
            ep = torch.export.export(model, example, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # the exporter raises many types (UserError, GuardOnDataDependentSymNode, ...)
        reason = " ".join(str(exc).split("\n\n")[0].split())
        raise ExportError(
            f"the fused model cannot be exported with torch.export ({type(exc).__name__}: {reason[:600]}); "
            "nothing was written. A model with data-dependent control flow cannot become a .pt2 program: "
            "write .pth or .safetensors instead"
        ) from exc
    return ep, dynamic_dims(ep, example)


def dynamic_dims(ep: "torch.export.ExportedProgram", example: tuple[Any, ...]) -> list[str]:
    """Which input dimensions stayed dynamic in ``ep``, in words (e.g. ``input 0: batch, 2, 3 dynamic``)."""
    import torch

    notes = []
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in set(ep.graph_signature.user_inputs)]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dyn = [d for d, size in enumerate(val.shape) if not isinstance(size, int)
               and not torch.fx.experimental.symbolic_shapes.is_concrete_int(size)]
        static = [d for d in range(val.dim()) if d not in dyn]
        # the ones exported as Dim.AUTO (every one but the channel dimension 1) that the model made static
        fixed = [d for d in static if d != 1]
        words = ["batch" if d == 0 else str(d) for d in dyn]
        notes.append(f"input {i} {'x'.join(str(int(s)) if d in static else '?' for d, s in enumerate(val.shape))}: "
                     + (f"dynamic {', '.join(words)}" if dyn else "every dimension static")
                     + ("" if not dyn or not fixed else
                        f"; the model fixes dimension(s) {', '.join('0 (batch)' if d == 0 else str(d) for d in fixed)}"))
    return notes


def pt2_bytes(model: "nn.Module", args: tuple[Any, ...], metadata: dict[str, Any], *, verbose: bool = False
              ) -> "tuple[bytes, list[str]]":
    """``model`` as a ``.pt2`` file's bytes with bnfuse's record inside, and notes on its dynamic dimensions."""
    ep, dims = export_program(model, args, verbose=verbose)
    return program_bytes(ep, metadata), dims


def program_bytes(ep: "torch.export.ExportedProgram", metadata: dict[str, Any]) -> bytes:
    """The ``.pt2`` archive of ``ep`` with bnfuse's record inside."""
    import torch

    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={META_FILE: json.dumps(metadata)})
    return buf.getvalue()


def load_program(path: Path) -> "tuple[torch.export.ExportedProgram, dict[str, Any]]":
    """A ``.pt2`` file: (the program, bnfuse's record, {} when absent)."""
    import torch

    extra = {META_FILE: ""}
    with quiet():
        ep = torch.export.load(str(path), extra_files=extra)
    raw = extra[META_FILE]
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise OutputError(f"{path}: its bnfuse record is not valid JSON ({first_line(str(exc))})") from exc
    return ep, meta if isinstance(meta, dict) else {}


def check_program(tmp: Path, expected: "dict[str, torch.Tensor]", metadata: dict[str, Any]
                  ) -> "tuple[list[str], list[str], list[str], bool]":
    """The read-back proof of a ``.pt2`` file: loaded with ``torch.export.load``, its weights (by name)
    against the fused model's, value for value, and its record against the one written."""
    from .readback import meta_equal

    ep, meta = load_program(tmp)
    got = ep.state_dict
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    return missing, extra, _differing(expected, got), meta_equal(meta, metadata)


def _differing(expected: "dict[str, torch.Tensor]", got: "dict[str, torch.Tensor]") -> list[str]:
    """The names in both whose tensors differ in dtype, shape or any value."""
    import torch

    return [k for k, e in expected.items() if k in got and not (
        got[k].dtype == e.dtype and got[k].shape == e.shape and torch.equal(got[k].detach().cpu(), e.detach().cpu()))]


# --------------------------------------------------------------------------- ONNX (the ``onnx`` extra)

#: the ONNX opset bnfuse exports (PyTorch's exporter's own default; onnxruntime 1.17+ runs it)
OPSET = 20
#: the modules of the ``onnx`` extra
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")


def require_onnx(purpose: str = ".onnx", instead: str = "write .pt2, .pth or .safetensors") -> None:
    """An :class:`ExtraMissing` naming the install command when the ``onnx`` extra is not installed
    (``purpose``: what needs it; ``instead``: what to do without it)."""
    import importlib

    missing = []
    for name in ONNX_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExtraMissing(
            f"{purpose} needs the onnx extra ({', '.join(ONNX_EXTRA)}), and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'bnfuse[onnx]', or {instead}"
        )


def onnx_bytes(model: "nn.Module", args: tuple[Any, ...], metadata: dict[str, Any], *, verbose: bool = False
               ) -> "tuple[bytes, list[str]]":
    """``model`` exported to ONNX (opset :data:`OPSET`) by PyTorch's ``torch.export``-based exporter, with
    bnfuse's record in ``metadata_props``: (the file's bytes, notes on its dynamic dimensions)."""
    import onnx
    import torch

    example, batched = _batch_of_two(args)
    shapes = _auto_dims(example) if batched else None
    try:
        with quiet(verbose), torch.no_grad():
            program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=shapes, opset_version=OPSET,
                                        verbose=verbose, external_data=False)
    except Exception as exc:  # the exporter wraps most failures in OnnxExporterError; the cause says why
        cause = exc.__cause__ or exc
        reason = " ".join(_plain(str(cause)).split("\n\n")[0].split())
        raise ExportError(
            f"the fused model cannot be exported to ONNX ({type(cause).__name__}: {reason[:600]}); nothing was "
            "written. A model with data-dependent control flow cannot become an ONNX graph: write .pth or "
            ".safetensors instead"
        ) from exc
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(metadata)})
    if proto.ByteSize() >= 2**31:
        raise ExportError(f"the fused model's ONNX graph is {proto.ByteSize() / 2**30:.1f} GiB, above protobuf's "
                          "2 GiB limit for one file: write .pt2 instead")
    notes = []
    for i, inp in enumerate(proto.graph.input):
        dims = inp.type.tensor_type.shape.dim
        dyn = [d for d, dim in enumerate(dims) if dim.dim_param]
        notes.append(f"input {i} {'x'.join(dim.dim_param and '?' or str(dim.dim_value) for dim in dims)}: "
                     + (f"dynamic {', '.join('batch' if d == 0 else str(d) for d in dyn)}" if dyn
                        else "every dimension static") + f"; opset {OPSET}")
    return proto.SerializeToString(), notes


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (the ONNX exporter's messages carry them)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _onnx_meta(proto: Any) -> dict[str, Any]:
    raw = next((p.value for p in proto.metadata_props if p.key == META_KEY), "")
    meta = json.loads(raw) if raw else {}
    return meta if isinstance(meta, dict) else {}


def onnx_weights(proto: Any) -> "dict[str, torch.Tensor]":
    """The graph's weights by the fused model's names: its initializers (named after the state_dict keys;
    the exporter adds constants of its own and drops tensors the graph does not use), and the bias of
    each Conv, ConvTranspose or Gemm node reading ``NAME.weight``: zeros where the node has none (the
    exporter removes an all-zero bias, which ONNX defines as zero), its bias initializer otherwise."""
    import torch
    from onnx import helper, numpy_helper

    found = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if not weight.endswith(".weight") or weight not in found or weight[:-7] + ".bias" in found:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] in found:
                found[weight[:-7] + ".bias"] = found[node.input[2]]
            continue
        w = found[weight]
        if node.op_type == "Gemm" and attrs.get("transB", 0) != 1:
            continue  # a weight laid out (in, out): not the layer's own
        out = w.shape[1] * int(attrs.get("group", 1)) if node.op_type == "ConvTranspose" else w.shape[0]
        found[weight[:-7] + ".bias"] = torch.zeros(out, dtype=w.dtype)
    return found


def check_onnx(tmp: Path, expected: "dict[str, torch.Tensor]", metadata: dict[str, Any]
               ) -> "tuple[list[str], list[str], list[str], bool]":
    """The read-back proof of an ``.onnx`` file: ``onnx.checker`` (full check), every initializer named
    after a weight equal to it, and the record in ``metadata_props`` equal to the one written.  Weights
    the graph does not hold (unused, or all-zero ones the exporter folds away) cannot be compared here:
    the runtime judgement covers what the graph computes."""
    import onnx

    from .readback import meta_equal

    onnx.checker.check_model(str(tmp), full_check=True)
    proto = onnx.load(str(tmp))
    return [], [], _differing(expected, onnx_weights(proto)), meta_equal(_onnx_meta(proto), metadata)


def _onnx_module_class() -> Any:
    """The module class that runs an ``.onnx`` file (made on first use: it needs torch)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from torch import nn

    feed_types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                  "tensor(int64)": np.int64}

    class OnnxProgram(nn.Module):
        """An ``.onnx`` file run by onnxruntime (the CUDA provider for a CUDA device when it has one, else
        the CPU provider), called like a module: tensors in, tensors out on the input's device and dtype.
        Its initializers are kept as (unused) parameters under their names, so that it can be counted and
        its fold sites mapped like any fused model; onnxruntime runs the file's own copy."""

        def __init__(self, path: Path, device: str = "cpu", options: Any = None) -> None:
            super().__init__()
            proto = onnx.load(str(path))
            self.metadata = _onnx_meta(proto)
            for name, t in onnx_weights(proto).items():
                self.register_parameter(name.replace(".", "/"), nn.Parameter(t, requires_grad=False))
            del proto
            providers = ["CPUExecutionProvider"]
            if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(path), options if options is not None else session_options(),
                                                providers=providers)
            self.provider = self.session.get_providers()[0]
            self.eval()

        def forward(self, *args: "torch.Tensor") -> Any:
            feeds = {}
            for meta, x in zip(self.session.get_inputs(), args):
                want = feed_types.get(meta.type)
                arr = x.detach().to("cpu", torch.float32 if x.dtype == torch.bfloat16 else x.dtype).numpy()
                feeds[meta.name] = arr.astype(want) if want is not None else arr
            outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
            if args:
                outs = [o.to(args[0].device, args[0].dtype if o.is_floating_point() else o.dtype) for o in outs]
            return outs[0] if len(outs) == 1 else tuple(outs)

    return OnnxProgram


def open_onnx(path: Path, device: str = "cpu", *, level: "str | None" = None, threads: "int | None" = None,
              optimized_path: "Path | None" = None, spinning: "bool | None" = None
              ) -> "tuple[nn.Module, dict[str, Any]]":
    """An ``.onnx`` file as a module run by onnxruntime, and bnfuse's record in it; the session's
    options as :func:`session_options` makes them from the keyword arguments."""
    require_onnx()
    module = _onnx_module_class()(path, device, session_options(level=level, threads=threads,
                                                                optimized_path=optimized_path, spinning=spinning))
    return module, module.metadata


#: onnxruntime's graph optimisation levels by name (``GraphOptimizationLevel.ORT_<NAME>``)
ORT_LEVELS = ("disable_all", "enable_basic", "enable_extended", "enable_layout", "enable_all")


def session_options(*, level: "str | None" = None, threads: "int | None" = None,
                    optimized_path: "Path | None" = None, spinning: "bool | None" = None) -> Any:
    """The one place bnfuse builds onnxruntime session options: warnings off, and optionally the graph
    optimisation ``level`` (a name of :data:`ORT_LEVELS`; None: onnxruntime's default), the intra-op
    ``threads`` (None: onnxruntime's choice) and ``optimized_path``, where onnxruntime saves the graph
    it optimised (to count what its own fusions left); ``spinning`` False stops idle intra-op threads
    from spinning between runs (``session.intra_op.allow_spinning``; None: onnxruntime's default, on),
    so that two sessions run alternately do not slow each other down."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level.upper()}")
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def open_pt2(path: Path, device: str = "cpu") -> "tuple[nn.Module, dict[str, Any]]":
    """A ``.pt2`` file as its program's module, and bnfuse's record in it."""
    ep, meta = load_program(path)
    return ep.module(), meta


def program_weights(module: "nn.Module") -> "dict[str, torch.Tensor]":
    """An opened program's weights by the fused model's names (an ONNX program keeps them with ``/``)."""
    return {k.replace("/", "."): v for k, v in module.state_dict().items()}
