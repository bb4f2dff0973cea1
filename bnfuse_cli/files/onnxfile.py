"""Fused models as ONNX files (the ``onnx`` extra): exported by PyTorch's ``torch.export``-based exporter,
read back bit for bit, and run by onnxruntime.

ONNX is one protobuf message, and protobuf holds at most 2 GiB.  A model whose parameters come near that
(:data:`EXTERNAL_AT`, decided from the parameter bytes before the export starts) is written the way every
exporter and runtime handles large models, with its tensors as *external data*: ``NAME.onnx`` and, beside
it, ``NAME.onnx.<16 hex digits of its digest>.data``.  The data file's name is derived from the output's
and from its contents, so a new pair never overwrites the data an existing model reads (the writer,
:mod:`.write`, places the data file first and the model last).

Every ``.onnx`` read from disk goes through ``onnx.checker`` first, which refuses external data outside
the model's folder, absolute paths and symbolic links (onnxruntime itself follows symbolic links);
tensors kept outside the model are mapped from their file, not copied.  onnxruntime also takes a model as
bytes, so a model that fits in one message needs no file at all to be run (``bench``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .export import ExtraMissing, _auto_dims, _batch_of_two, _differing, export_failure, quiet
from .formats import CHUNK, META_KEY, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["OPSET", "EXTERNAL_AT", "OnnxExternal", "require_onnx", "export_onnx", "check_onnx", "open_onnx",
           "open_exported", "onnx_weights", "data_files", "session_options", "ORT_LEVELS", "parameter_bytes"]

#: the ONNX opset bnfuse exports (PyTorch's exporter's own default; onnxruntime 1.17+ runs it)
OPSET = 20
#: the modules of the ``onnx`` extra
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")
#: protobuf's limit for one message: an ONNX file without external data is at most this large
PROTOBUF_LIMIT = 1 << 31
#: parameter bytes from which a model is written with external data (256 MiB left for the graph itself)
EXTERNAL_AT = PROTOBUF_LIMIT - (256 << 20)


def require_onnx(purpose: str = ".onnx", instead: "str | None" = "write .pt2, .pth or .safetensors") -> None:
    """An :class:`ExtraMissing` naming the install command when the ``onnx`` extra is not installed
    (``purpose``: what needs it; ``instead``: what to do without it, if there is anything)."""
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
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'bnfuse[onnx]'"
            + (f", or {instead}" if instead else "")
        )


def parameter_bytes(model: "nn.Module") -> int:
    """The bytes of ``model``'s parameters and buffers, each storage counted once."""
    seen: dict[tuple[str, int], int] = {}
    for t in model.state_dict().values():
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


@dataclass
class OnnxExternal:
    """An exported model written with external data: not yet on disk (:meth:`save` writes it)."""

    #: torch's ``ONNXProgram``, bnfuse's record already in its metadata
    program: Any

    def save(self, folder: Path, name: str) -> list[str]:
        """Write ``folder/name`` and its data file beside it (torch's own writer, then the data file renamed
        after its digest); the names of the files written besides ``name``."""
        model = folder / name
        self.program.save(str(model), external_data=True)  # writes NAME and NAME.data
        written = folder / f"{name}.data"
        digest = hashlib.blake2b(digest_size=8)
        with open(written, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                digest.update(chunk)
        data = f"{name}.{digest.hexdigest()}.data"
        os.replace(written, folder / data)
        point_external_data(model, data)
        return [data]


def point_external_data(model: Path, location: str) -> None:
    """Point every external tensor of the ONNX file ``model`` at ``location`` (relative to its folder)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(model))


def export_onnx(model: "nn.Module", args: tuple[Any, ...], metadata: dict[str, Any], *, verbose: bool = False
                ) -> "tuple[bytes | OnnxExternal, list[str]]":
    """``model`` exported to ONNX (opset :data:`OPSET`), bnfuse's record in ``metadata_props``: (the file's
    bytes, or an :class:`OnnxExternal` when its parameters reach :data:`EXTERNAL_AT`; notes on its dynamic
    dimensions).  Whether the tensors go to external data is decided before the export starts."""
    external = parameter_bytes(model) >= EXTERNAL_AT
    program = _export(model, args, verbose)
    program.model.metadata_props[META_KEY] = json.dumps(metadata)
    _name_dims(program.model)
    notes = _dims_notes(program.model)
    if not external:
        proto = program.model_proto
        if proto.ByteSize() < PROTOBUF_LIMIT:
            return proto.SerializeToString(), notes
        del proto  # a graph larger than its parameters suggested: it goes to external data too
    size = parameter_bytes(model)
    return OnnxExternal(program), notes + [
        f"{size / 2**30:.2f} GiB of weights, written as ONNX external data beside the model (NAME.onnx and "
        "NAME.onnx.<digest>.data, kept together in one folder): one ONNX file holds at most 2 GiB"]


def _export(model: "nn.Module", args: tuple[Any, ...], verbose: bool) -> Any:
    import torch

    example, batched = _batch_of_two(args)
    shapes = _auto_dims(example) if batched else None
    try:
        with quiet(verbose), torch.no_grad():
            return torch.onnx.export(model, example, dynamo=True, dynamic_shapes=shapes, opset_version=OPSET,
                                     verbose=verbose, external_data=False)
    except Exception as exc:  # the exporter wraps most failures in OnnxExporterError; the cause says why
        raise export_failure(exc, "the ONNX exporter", "an ONNX graph") from exc


#: what the dynamic axes of an input are called in the graph, by its rank (after batch and channels)
_AXES = {3: ("length",), 4: ("height", "width"), 5: ("depth", "height", "width")}


def _name_dims(model: Any) -> None:
    """The exporter's symbols for the dynamic input dimensions (``s77``) renamed after the axes they stand
    for (``batch``, ``height``, ``width``; ``dim3`` where the rank says nothing), throughout the graph, so
    that Netron and onnxruntime's messages speak of them by name."""
    import re

    import onnx_ir as ir

    names: dict[str, str] = {}
    many = len(model.graph.inputs) > 1
    for i, value in enumerate(model.graph.inputs):
        rank = len(value.shape or ())
        for d, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in names:
                axes = _AXES.get(rank, ())
                name = "batch" if d == 0 else axes[d - 2] if 2 <= d < 2 + len(axes) else f"dim{d}"
                names[dim.value] = f"{name}_{i}" if many and f"{name}" in names.values() else name

    def rename(value: Any) -> None:
        if value.shape is None:
            return
        value.shape = ir.Shape([ir.SymbolicDim(re.sub(r"\b\w+\b", lambda m: names.get(m.group(0), m.group(0)),
                                                      dim.value)) if isinstance(dim, ir.SymbolicDim) and dim.value
                                else dim for dim in value.shape])

    for value in (*model.graph.inputs, *model.graph.outputs):
        rename(value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            rename(value)


def _dims_notes(model: Any) -> list[str]:
    """``input 0 batchx3xheightxwidth: dynamic batch, height, width; opset 20`` for each input of the graph."""
    notes = []
    for i, value in enumerate(model.graph.inputs):
        dims = list(value.shape or [])
        dyn = [str(dim.value) for dim in dims if not isinstance(dim, int)]
        notes.append(f"input {i} {'x'.join(str(dim if isinstance(dim, int) else dim.value) for dim in dims)}: "
                     + (f"dynamic {', '.join(dyn)}" if dyn else "every dimension static") + f"; opset {OPSET}")
    return notes


def _onnx_meta(proto: Any) -> dict[str, Any]:
    raw = next((p.value for p in proto.metadata_props if p.key == META_KEY), "")
    meta = json.loads(raw) if raw else {}
    return meta if isinstance(meta, dict) else {}


def checked_proto(path: Path) -> Any:
    """The model at ``path`` without its external data, once ``onnx.checker`` accepts the file: a refusal
    (external data outside the model's folder, an absolute path, a symbolic link, a malformed graph) is a
    :class:`CheckpointError` naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - ValidationError, DecodeError, OSError...
        raise CheckpointError(
            f"{path} is refused by onnx's checker ({first_line(str(exc))}). bnfuse reads an ONNX model's external "
            "data only from files in the model's own folder (no absolute path, no '..', no symbolic link), as "
            "onnx does; keep the .onnx file and its data file together, as they were written"
        ) from exc


def _tensor(init: Any, base: "Path | None") -> "torch.Tensor":
    """An initializer as a tensor: mapped from its data file when it has one (no copy), else read."""
    import numpy as np
    import torch
    from onnx import external_data_helper, helper, numpy_helper

    if base is not None and external_data_helper.uses_external_data(init) and init.dims and all(init.dims):
        info = external_data_helper.ExternalDataInfo(init)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        if dtype.kind in "fiub":
            return torch.from_numpy(np.memmap(base / info.location, dtype=dtype.newbyteorder("<"), mode="c",
                                              offset=int(info.offset or 0), shape=tuple(init.dims)))
    return torch.from_numpy(numpy_helper.to_array(init, base_dir=str(base or "")).copy())


def onnx_weights(proto: Any, base: "Path | None" = None) -> "dict[str, torch.Tensor]":
    """The graph's weights by the fused model's names: its initializers (named after the state_dict keys;
    the exporter adds constants of its own and drops tensors the graph does not use; those in external
    data read from ``base``, the model's folder), and the bias of each Conv, ConvTranspose or Gemm node
    reading ``NAME.weight``: zeros where the node has none (the exporter removes an all-zero bias, which
    ONNX defines as zero), its bias initializer otherwise."""
    import torch
    from onnx import helper

    found = {i.name: _tensor(i, base) for i in proto.graph.initializer}
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
    after a weight equal to it bit for bit (external data compared where it lies), and the record in
    ``metadata_props`` equal to the one written.  Weights the graph does not hold (unused, or all-zero
    ones the exporter folds away) cannot be compared here: the runtime judgement covers what the graph
    computes."""
    import onnx

    from .readback import meta_equal

    onnx.checker.check_model(str(tmp), full_check=True)
    proto = onnx.load(str(tmp), load_external_data=False)
    return [], [], _differing(expected, onnx_weights(proto, Path(tmp).parent)), meta_equal(_onnx_meta(proto), metadata)


def data_files(path: Path) -> list[Path]:
    """The data files bnfuse wrote for the ``.onnx`` file at ``path`` (``NAME.<digest>.data`` beside it, read
    from the model itself); [] when there is none, or no readable model."""
    import onnx
    from onnx import external_data_helper

    if not path.is_file():
        return []
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model bnfuse can read: nothing of it is bnfuse's to remove
        return []
    ours = re.compile(re.escape(path.name) + r"\.[0-9a-f]{16}\.data")
    found = {external_data_helper.ExternalDataInfo(t).location for t in proto.graph.initializer
             if external_data_helper.uses_external_data(t)}
    return [path.parent / name for name in sorted(found) if ours.fullmatch(name)]


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
        """An ONNX model (a file, or bytes) run by onnxruntime (the CUDA provider for a CUDA device when it has
        one, else the CPU provider), called like a module: tensors in, tensors out on the input's device and
        dtype.  Its initializers are kept as (unused) parameters under their names, so that it can be counted
        and its fold sites mapped like any fused model; onnxruntime runs its own copy."""

        def __init__(self, source: "Path | bytes", device: str = "cpu", options: Any = None) -> None:
            super().__init__()
            if isinstance(source, (bytes, bytearray)):
                proto, base, model = onnx.load_model_from_string(bytes(source)), None, bytes(source)
            else:
                proto, base, model = checked_proto(source), Path(source).parent, str(source)
            self.metadata = _onnx_meta(proto)
            for name, t in onnx_weights(proto, base).items():
                self.register_parameter(name.replace(".", "/"), nn.Parameter(t, requires_grad=False))
            del proto
            providers = ["CPUExecutionProvider"]
            if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(model, options if options is not None else session_options(),
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


def open_onnx(source: "Path | bytes", device: str = "cpu", *, level: "str | None" = None,
              threads: "int | None" = None, optimized_path: "Path | str | None" = None,
              spinning: "bool | None" = None, optimized_data: bool = False, allow_pickle: bool = False
              ) -> "tuple[nn.Module, dict[str, Any]]":
    """An ONNX model (an ``.onnx`` file, checked by ``onnx.checker`` first, or its bytes) as a module run by
    onnxruntime, and bnfuse's record in it; the session's options as :func:`session_options` makes them from
    the keyword arguments.  ``allow_pickle`` changes nothing: an ONNX file holds no code to allow."""
    require_onnx(f"reading {source}" if isinstance(source, Path) else ".onnx", None)
    options = session_options(level=level, threads=threads, optimized_path=optimized_path, spinning=spinning,
                              optimized_data=optimized_data)
    module = _onnx_module_class()(source, device, options)
    return module, module.metadata


def open_exported(data: "bytes | OnnxExternal", what: str, **session: Any) -> "tuple[nn.Module, Any]":
    """An exported model (:func:`export_onnx`) opened in onnxruntime with the options ``session`` gives
    :func:`session_options`: (the module, the graph onnxruntime saved after optimising it, without its data).
    The session takes the model as bytes: no file at all.  A model above 2 GiB is written, with its external
    data, into a private folder removed once the session has read it.  The optimised graph goes to memory
    where the system allows it (:func:`~.temporaries.scratch_file`).  A failed write (``ulimit -f``, a full
    temporary folder) is an :class:`~bnfuse_cli.errors.OutputError` naming ``what``; nothing is left behind."""
    import contextlib

    import onnx

    from ..errors import OutputError
    from .temporaries import scratch_file, scratch_folder, write_failure

    with contextlib.ExitStack() as stack:
        try:
            if isinstance(data, OnnxExternal):  # onnxruntime reads a model above 2 GiB, and its data, from files
                folder = stack.enter_context(scratch_folder("bench"))
                optimized = folder / "optimized.onnx"
                data.save(folder, "model.onnx")
                module, _ = open_onnx(folder / "model.onnx", "cpu", optimized_path=optimized, optimized_data=True,
                                      **session)
            else:
                optimized = stack.enter_context(scratch_file("bench", "optimized.onnx"))
                module, _ = open_onnx(data, "cpu", optimized_path=optimized, **session)
        except Exception as exc:  # onnxruntime says "Protobuf serialization failed" when its write fails
            cause = exc if isinstance(exc, OSError) and exc.errno else write_failure(optimized.parent if isinstance(
                data, OnnxExternal) else optimized)
            if cause is None:
                raise
            raise OutputError(
                f"onnxruntime could not save its optimised graph of {what}: {cause.strerror} ("
                + ("the file size limit, ulimit -f, is below the graph's size: raise it" if cause.errno == errno.EFBIG
                   else f"no space is left in {optimized.parent}: free space there or set TMPDIR to another folder")
                + "); nothing was left behind") from exc
        return module, onnx.load(str(optimized), load_external_data=False)


#: onnxruntime's graph optimisation levels by name (``GraphOptimizationLevel.ORT_<NAME>``)
ORT_LEVELS = ("disable_all", "enable_basic", "enable_extended", "enable_layout", "enable_all")


def session_options(*, level: "str | None" = None, threads: "int | None" = None,
                    optimized_path: "Path | str | None" = None, spinning: "bool | None" = None,
                    optimized_data: bool = False) -> Any:
    """The one place bnfuse builds onnxruntime session options: warnings off, and optionally the graph
    optimisation ``level`` (a name of :data:`ORT_LEVELS`; None: onnxruntime's default), the intra-op
    ``threads`` (None: onnxruntime's choice) and ``optimized_path``, where onnxruntime saves the graph
    it optimised (to count what its own fusions left); ``spinning`` False stops idle intra-op threads
    from spinning between runs (``session.intra_op.allow_spinning``; None: onnxruntime's default, on),
    so that two sessions run alternately do not slow each other down.  ``optimized_data`` keeps the optimised
    graph's tensors in a data file beside it (for a model above 2 GiB)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level.upper()}")
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        if optimized_data:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             f"{Path(optimized_path).name}.data")
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options
