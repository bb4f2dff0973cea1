"""Write a checkpoint without ever losing a file: an anonymous temporary file, fsynced, read back and
checked (:mod:`.readback`), then linked or renamed into place; every OS failure an :class:`OutputError`.

Where ``O_TMPFILE`` is missing, a named ``.NAME.bnfuse-tmp.HOST.PID.RANDOM`` file is used, and a later
write removes those left by dead processes (:mod:`.temporaries`).  An output of several files (an ``.onnx``
model and its external data) is written whole into a folder of that name beside it, checked there, and
placed data first and model last, so that the model, placed in one step, only ever reads complete data.
The module keeps no state: a caller that must say which outputs were placed (the CLI, when interrupted)
passes its own ``placed`` list to each write.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import OutputError
from .table import Format, Payload, output_format
from .readback import verify_written
from .place import _WRITE_HINTS, _cause, _is_placed, _place_files, _put_in_place
from .temporaries import _make_staging_folder, _open_temporary, _remove, _remove_stale_temporaries, write_failure

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["write_checkpoint", "write_text", "check_output_path"]

def check_output_path(output: Path, *, inputs: "list[Path]" = (), force: bool = False) -> None:  # type: ignore[assignment]
    """Refuse to overwrite an input, an existing file without ``force``, or write where we cannot
    (checked before any work; :func:`write_checkpoint` enforces ``force`` again when it places the file)."""
    output_format(output)  # a suffix bnfuse writes
    for src in inputs:
        if src.exists() and output.exists() and output.resolve() == src.resolve():
            raise OutputError(f"{output} is the input file: bnfuse never overwrites its input; choose another -o")
    if output.is_dir():
        raise OutputError(f"{output} is a directory: give a file name such as {output / 'fused.pth'}")
    if os.path.lexists(output) and not output.exists() and not force:
        raise OutputError(f"{output} already exists as a symbolic link to {os.readlink(output)}, which does not "
                          "exist: pass --force to replace the link, or choose another -o")
    if output.exists() and not force:
        raise OutputError(f"{output} already exists: pass --force to replace it (the old file stays until the new "
                          "one is complete)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {output}: the directory {parent} does not exist")
    # a real probe: os.access says yes to root on read-only file systems and /sys
    try:
        fd, named = _open_temporary(parent, output.name)
    except OSError as exc:
        raise OutputError(
            f"cannot write {output}: the directory {parent} is not writable ({exc.strerror or exc}); "
            "choose another -o"
        ) from exc
    os.close(fd)
    if named is not None:
        named.unlink(missing_ok=True)


def write_checkpoint(
    output: "str | os.PathLike[str]",
    *,
    state_dict: "dict[str, torch.Tensor]",
    metadata: dict[str, Any],
    module: "nn.Module | None" = None,
    program: "bytes | Any | None" = None,
    force: bool = False,
    placed: "list[Path] | None" = None,
    prove: "Callable[[Path], None] | None" = None,
    _after_write: "Callable[[Path], None] | None" = None,
) -> int:
    """Write atomically in the format of ``output``'s suffix (:mod:`.outputs`); return the file size.

    ``.safetensors``: the state_dict, with ``metadata`` as a JSON string under ``bnfuse``.
    ``.pth``/``.pt``: ``{"bnfuse": metadata, "state_dict": ...}`` (loads with weights_only=True),
    or ``torch.save(module)`` when ``module`` is given.  ``.pt2``: ``program``, the bytes of an
    exported program (:func:`bnfuse_cli.files.export.program_bytes`), whose weights must equal
    ``state_dict``.

    The data goes to an anonymous file (``O_TMPFILE``; a named ``.NAME.bnfuse-tmp.*`` file where that is
    not supported), is fsynced, read back and checked by the format's proof, then by ``prove`` (the
    caller's judgement of the file in its own runtime, raising to refuse it), and placed: ``force=False``
    links it into place and fails with :class:`OutputError` if ``output`` exists, even when another process
    created it during the write; ``force=True`` renames it over ``output`` atomically. Then the directory is
    fsynced. The file gets mode 0666 less the umask.  ``output`` is appended to ``placed`` (when given) the
    moment it is in place, also when an interrupt arrives right after the link or rename, so the list is
    true at every instant: an output not in it was not created or changed.  An OS-level failure (ENOSPC,
    EFBIG, EIO, EROFS, EDQUOT) is an :class:`OutputError` naming the file and the cause; nothing is left
    behind and an old file is intact.

    A ``program`` that writes itself as several files (an ``.onnx`` model above 2 GiB and its external data,
    see :class:`~.outputs.Payload`) is written into a staging folder beside ``output`` and checked there the
    same way; its data files are placed first and the model last, so a failure or an interrupt at any point
    leaves neither new file (a kill -9 in the instant between the two placements leaves the new data file
    alone, under a name no model reads).  ``force`` replaces the old model and then removes the data files
    it read.
    """
    output = Path(output)
    fmt = output_format(output)
    payload = Payload(state_dict, metadata, module, program)
    _may_write(output, fmt, payload, force)
    if payload.files:
        return _write_files(output, fmt, payload, force=force, placed=placed, prove=prove, _after_write=_after_write)
    replaced = _companions(fmt, output, force)
    with _temporary(output, placed) as (fd, tmp, named, kept, leftovers):
        _write_data(fd, output, fmt, payload, kept)
        if _after_write is not None:
            _after_write(tmp)
        verify_written(tmp, fmt, payload, output)
        if prove is not None:
            prove(tmp)
        _put_in_place(output, tmp, named, force=force, kept=kept, placed=placed, leftovers=leftovers)
        for old in replaced:
            _remove(old)
        return os.fstat(fd).st_size


def write_text(output: "str | os.PathLike[str]", text: str, *, placed: "list[Path] | None" = None) -> int:
    """A report (JSON, Markdown) written whole or not at all, replacing ``output``: into a temporary
    file, fsynced, renamed into place, the directory fsynced, and appended to ``placed`` like a
    checkpoint (so an interrupt's message is true).  An OS-level failure is an :class:`OutputError`;
    returns the size."""
    output = Path(output)
    data = text.encode()
    with _temporary(output, placed) as (fd, tmp, named, kept, leftovers):
        try:
            _FdWriter(fd).write(data)
            os.fsync(fd)
        except OSError as exc:
            hint = _WRITE_HINTS.get(exc.errno or 0, "choose another path or retry")
            raise OutputError(f"cannot write {output}: {_cause(exc)}; {hint}. {kept[0].upper() + kept[1:]}") from exc
        _put_in_place(output, tmp, named, force=True, kept=kept, placed=placed, leftovers=leftovers)
        return len(data)


@contextlib.contextmanager
def _temporary(output: Path, placed: "list[Path] | None"
               ) -> "Iterator[tuple[int, Path, Path | None, str, list[Path]]]":
    """An empty temporary file for ``output`` in its directory: (fd, a path to it, its name or None
    when anonymous, what stays if the write fails, names to remove should it not complete).  On any
    failure or interrupt the temporary goes, and a file already placed is added to ``placed``."""
    _remove_stale_temporaries(output.parent, output.name)
    kept = f"the previous {output.name} is untouched" if os.path.lexists(output) else f"no {output.name} was created"
    try:
        fd, named = _open_temporary(output.parent, output.name)
    except OSError as exc:
        raise OutputError(
            f"cannot write {output}: {_cause(exc)} in the directory {output.parent}; choose another path"
        ) from exc
    tmp = named if named is not None else Path(f"/proc/self/fd/{fd}")
    leftovers = [] if named is None else [named]  # names to remove should the write not complete
    try:
        yield fd, tmp, named, kept, leftovers
    except BaseException:
        if placed is not None and not any(e is output for e in placed) and _is_placed(output, fd):
            placed.append(output)  # interrupted right after placing
        for name in leftovers:
            try:
                os.unlink(name)
            except OSError:
                pass
        raise
    finally:
        os.close(fd)


def _companions(fmt: Format, output: Path, force: bool) -> "list[Path]":
    """The files bnfuse wrote beside an output that ``force`` replaces (an ``.onnx`` file's external data),
    read before it is replaced: the new output replaces them too."""
    if not force or fmt.companions is None or not output.is_file():
        return []
    return fmt.companions(output)


def _write_files(output: Path, fmt: Format, payload: Payload, *, force: bool, placed: "list[Path] | None",
                 prove: "Callable[[Path], None] | None", _after_write: "Callable[[Path], None] | None") -> int:
    """An output of several files (the model and its data): written by ``payload.program`` into a staging folder
    beside ``output``, fsynced, read back and judged there, then placed data first and model last; the old
    output's own data files go once the new model is in place.  Returns the bytes written."""
    directory = output.parent if str(output.parent) else Path(".")
    _remove_stale_temporaries(directory, output.name)
    kept = f"the previous {output.name} is untouched" if os.path.lexists(output) else f"no {output.name} was created"
    replaced = _companions(fmt, output, force)
    try:
        folder = _make_staging_folder(directory, output.name)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {_cause(exc)} in the directory {directory}; choose another path"
                          ) from exc
    try:
        names = _save_files(folder, output, payload, kept)
        staged = folder / output.name
        if _after_write is not None:
            _after_write(staged)
        verify_written(staged, fmt, payload, output)
        if prove is not None:
            prove(staged)
        size = sum(os.stat(folder / name).st_size for name in [output.name, *names])
        _place_files(output, folder, names, force=force, kept=kept, placed=placed)
    finally:
        _remove(folder)
    for old in replaced:
        if old.name not in names:
            _remove(old)
    return size


def _save_files(folder: Path, output: Path, payload: Payload, kept: str) -> "list[str]":
    """Let the program write itself into ``folder`` (as ``output.name`` and the files it names), fsync them and
    give them the model file's mode (0666 less the umask); a failed write is an OutputError with its cause."""
    import stat

    try:
        names = list(payload.program.save(folder, output.name))
        mode = stat.S_IMODE(os.stat(folder / output.name).st_mode)
        for name in [output.name, *names]:
            os.chmod(folder / name, mode)
            fd = os.open(folder / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return names
    except Exception as exc:  # the exporter's writer may wrap the OSError of a failed write
        cause = exc if isinstance(exc, OSError) else next(
            (e for e in (exc.__cause__, exc.__context__) if isinstance(e, OSError)), None) or write_failure(folder)
        if cause is None:
            raise  # not a failed write: a bug
        hint = _WRITE_HINTS.get(cause.errno or 0, "choose another -o or retry")
        written = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        raise OutputError(f"cannot write {output}: {_cause(cause)} after {written:,} bytes; {hint}. The partial "
                          f"files were removed and {kept}") from exc


def _may_write(output: Path, fmt: Format, payload: Payload, force: bool) -> None:
    """An OutputError for what cannot be written at all, or not without ``force``."""
    if payload.module is not None and not fmt.holds_module:
        raise OutputError(f"{output}: a whole pickled module cannot be stored as {output.suffix}; use .pth")
    if fmt.program and payload.program is None:
        raise OutputError(f"{output}: a {output.suffix} file is a program exported from the model: export it first")
    if not force and os.path.lexists(output):
        raise OutputError(f"{output} already exists: pass --force to replace it")


def _write_data(fd: int, output: Path, fmt: Format, payload: Payload, kept: str) -> None:
    """Write the file's contents to ``fd`` and fsync them; a failed write is an OutputError with its cause."""
    writer = _FdWriter(fd)
    try:
        fmt.write(writer, payload, output)
        os.fsync(fd)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and writer.error is None and "unexpected pos" not in str(exc):
            raise  # not a failed write: a bug, or an object torch cannot save
        cause = exc if isinstance(exc, OSError) else writer.error or _guess_cause(fd)
        hint = _WRITE_HINTS.get(cause.errno or 0, "choose another -o or retry")
        raise OutputError(
            f"cannot write {output}: {_cause(cause)} after {os.fstat(fd).st_size:,} bytes; {hint}. The "
            f"partial file was removed and {kept}"
        ) from exc


# --------------------------------------------------------------------------- the bytes


class _FdWriter(io.RawIOBase):
    """A file object over a raw descriptor for ``torch.save`` that keeps the first ``OSError``: torch turns a
    failed write into ``RuntimeError: ... inline_container.cc ... unexpected pos``, losing the cause."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.error: "OSError | None" = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:done + (1 << 30)])
        except OSError as exc:
            self.error = self.error or exc
            raise
        return done


def _guess_cause(fd: int) -> OSError:
    """Why torch's own write failed when no OSError reached us: a full file system or the size limit."""
    try:
        import resource

        st = os.fstatvfs(fd)
        if st.f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.fstat(fd).st_size >= limit:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    except (ImportError, OSError, ValueError):
        pass
    return OSError(errno.EIO, "the write failed")
