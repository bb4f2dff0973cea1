"""Write a checkpoint without ever losing a file: an anonymous temporary file, fsynced, read back and
checked (:mod:`.readback`), then linked or renamed into place; every OS failure an :class:`OutputError`.

Where ``O_TMPFILE`` is missing, a named ``.NAME.bnfuse-tmp.HOST.PID.RANDOM`` file is used, and a later
write removes those left by dead processes.  The module keeps no state: a caller that must say which
outputs were placed (the CLI, when interrupted) passes its own ``placed`` list to each write.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import OutputError
from .outputs import OutputFormat, Payload, output_format
from .readback import verify_written

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["write_checkpoint", "write_text", "check_output_path"]

#: what to do about a failed write, by errno
_WRITE_HINTS = {
    errno.ENOSPC: "the file system is full: free space there or choose another -o",
    errno.EDQUOT: "the disk quota is used up: free space or choose another -o",
    errno.EFBIG: "the file is larger than the file size limit allows (ulimit -f, or the file system's own limit): "
                 "raise the limit or choose another -o",
    errno.EROFS: "the file system is read-only: choose another -o",
    errno.EIO: "the device reported an I/O error: check the disk or network file system and retry",
}


def check_output_path(output: Path, *, inputs: "list[Path]" = (), force: bool = False) -> None:  # type: ignore[assignment]
    """Refuse to overwrite an input, an existing file without ``force``, or write where we cannot
    (checked before any work; :func:`write_checkpoint` enforces ``force`` again when it places the file)."""
    output_format(output)  # a suffix bnfuse writes
    for src in inputs:
        if src.exists() and output.exists() and output.resolve() == src.resolve():
            raise OutputError(f"{output} is the input file: bnfuse never overwrites its input; choose another -o")
    if output.is_dir():
        raise OutputError(f"{output} is a directory: give a file name such as {output / 'fused.pth'}")
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
    program: "bytes | None" = None,
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
    """
    output = Path(output)
    fmt = output_format(output)
    payload = Payload(state_dict, metadata, module, program)
    _may_write(output, fmt, payload, force)
    with _temporary(output, placed) as (fd, tmp, named, kept, leftovers):
        _write_data(fd, output, fmt, payload, kept)
        if _after_write is not None:
            _after_write(tmp)
        verify_written(tmp, fmt, payload, output)
        if prove is not None:
            prove(tmp)
        _put_in_place(output, tmp, named, force=force, kept=kept, placed=placed, leftovers=leftovers)
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


def _may_write(output: Path, fmt: OutputFormat, payload: Payload, force: bool) -> None:
    """An OutputError for what cannot be written at all, or not without ``force``."""
    if payload.module is not None and not fmt.holds_module:
        raise OutputError(f"{output}: a whole pickled module cannot be stored as {output.suffix}; use .pth")
    if fmt.program and payload.program is None:
        raise OutputError(f"{output}: a {output.suffix} file is a program exported from the model: export it first")
    if not force and os.path.lexists(output):
        raise OutputError(f"{output} already exists: pass --force to replace it")


def _write_data(fd: int, output: Path, fmt: OutputFormat, payload: Payload, kept: str) -> None:
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


def _put_in_place(output: Path, tmp: Path, named: "Path | None", *, force: bool, kept: str,
                  placed: "list[Path] | None", leftovers: "list[Path]") -> None:
    """Link (``force`` False: never over a file) or rename the checked file into place, add it to
    ``placed``, fsync the directory. A name made for the rename is added to ``leftovers`` before it exists."""
    directory = output.parent
    try:
        dirfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {_cause(exc)} opening the directory {directory}") from exc
    try:
        try:
            if named is None and not force:  # no name ever: a crash now leaves nothing
                os.link(str(tmp), output.name, dst_dir_fd=dirfd, follow_symlinks=True)
            elif named is None:
                leftovers.append(directory / _temp_name(output.name))
                os.link(str(tmp), leftovers[-1].name, dst_dir_fd=dirfd, follow_symlinks=True)
                os.replace(leftovers[-1].name, output.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            elif not force:
                os.link(named.name, output.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            else:
                os.replace(named.name, output.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except FileExistsError as exc:
            raise OutputError(
                f"{output} was created by another process while bnfuse was writing it: it was left as it is "
                "and this result was not written; pass --force to replace it, or choose another -o"
            ) from exc
        except OSError as exc:
            hint = _WRITE_HINTS.get(exc.errno or 0, "choose another -o or retry")
            raise OutputError(f"cannot write {output}: {_cause(exc)} placing the file; {hint}; {kept}") from exc
        if placed is not None:
            placed.append(output)
        _sync_directory(dirfd, output)
        if named is not None and not force:
            os.unlink(named)  # linked into place: the temporary name goes
    finally:
        os.close(dirfd)


def _sync_directory(dirfd: int, output: Path) -> None:
    try:
        os.fsync(dirfd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # directories that cannot sync
            raise OutputError(
                f"{output} was written and checked, but its directory could not be synced ({_cause(exc)}): "
                "a crash now could lose it; check the disk"
            ) from exc


def _is_placed(output: Path, fd: int) -> bool:
    """Whether ``output`` now is the file open as ``fd`` (a link or rename happened)."""
    try:
        a, b = os.lstat(output), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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


def _cause(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


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


# --------------------------------------------------------------------------- temporary files


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"


def _temp_name(output_name: str) -> str:
    """``.NAME.bnfuse-tmp.HOST.PID.RANDOM``: whose it is, so a later write can tell a stale one."""
    return f".{output_name}.bnfuse-tmp.{_host()}.{os.getpid()}.{os.urandom(4).hex()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove_stale_temporaries(directory: Path, output_name: str) -> None:
    """Remove named temporary files of earlier writes of ``output_name`` whose process has died (kill -9,
    power loss) on this host. Only bnfuse's own pattern, only dead processes, only this host: a
    temporary file of a write still running, here or on another machine sharing the directory, stays."""
    prefix = f".{output_name}.bnfuse-tmp."
    pattern = re.compile(re.escape(prefix) + r"(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}")
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        found = pattern.fullmatch(name)
        if found and found["host"] == _host() and not _alive(int(found["pid"])):
            try:
                os.unlink(directory / name)
            except OSError:
                pass


def _open_temporary(directory: Path, output_name: str) -> "tuple[int, Path | None]":
    """A new empty file in ``directory``, mode 0666 less the umask: (fd, None) for an anonymous file
    (Linux ``O_TMPFILE``: it has no name, so no crash can leave it behind), else (fd, its name)."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile and os.path.isdir("/proc/self/fd"):  # linking it into place needs /proc/self/fd
        try:
            return os.open(directory, tmpfile | os.O_RDWR | cloexec, 0o666), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # not supported here: fall back
                raise
    named = directory / _temp_name(output_name)
    return os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL | cloexec, 0o666), named
