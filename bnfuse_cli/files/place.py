"""Put a written, checked output in its final place without ever losing a file: link it (never over an
existing file) or rename it over the old one (``--force``), in one step each, then fsync the directory;
every OS failure an :class:`OutputError` that names the file, the cause and what to do about it.

One file is placed by :func:`_put_in_place`; an output of several files (an ``.onnx`` model and its external
data) by :func:`_place_files`, data first and model last.  ``placed`` (the caller's list) gets each output the
moment it is in place, also when an interrupt arrives right after the link or rename.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import OutputError
from .temporaries import _remove, _temp_name

#: what to do about a failed write, by errno
_WRITE_HINTS = {
    errno.ENOSPC: "the file system is full: free space there or choose another -o",
    errno.EDQUOT: "the disk quota is used up: free space or choose another -o",
    errno.EFBIG: "the file is larger than the file size limit allows (ulimit -f, or the file system's own limit): "
                 "raise the limit or choose another -o",
    errno.EROFS: "the file system is read-only: choose another -o",
    errno.EIO: "the device reported an I/O error: check the disk or network file system and retry",
}


def _place_files(output: Path, folder: Path, names: "list[str]", *, force: bool, kept: str,
                 placed: "list[Path] | None") -> None:
    """Link each data file into place (a file of that name from an earlier write of the same bytes, or with
    ``force``, is replaced), then link the model (``force``: rename it over the old one, in one step).  On any
    failure or interrupt before the model is in place, the data files this write added are removed."""
    directory = output.parent if str(output.parent) else Path(".")
    staged = folder / output.name
    ident = (os.stat(staged).st_dev, os.stat(staged).st_ino)
    added: list[Path] = []
    try:
        for name in names:
            try:
                os.link(folder / name, directory / name)
                added.append(directory / name)
            except FileExistsError:
                if not force and os.stat(directory / name).st_size != os.stat(folder / name).st_size:
                    raise OutputError(f"cannot write {output}: {directory / name} already exists and is not the data "
                                      f"of this model; pass --force to replace it, or choose another -o") from None
                os.replace(folder / name, directory / name)  # the same name holds the same digest: same bytes
        if force:
            os.replace(staged, output)
        else:
            os.link(staged, output)
    except BaseException as exc:
        now = os.lstat(output) if os.path.lexists(output) else None
        if now is not None and (now.st_dev, now.st_ino) == ident:  # interrupted right after placing the model
            if placed is not None and not any(p is output for p in placed):
                placed.append(output)
            raise
        for path in added:
            _remove(path)
        if isinstance(exc, FileExistsError):
            raise OutputError(f"{output} was created by another process while bnfuse was writing it: it was left as "
                              "it is and this result was not written; pass --force to replace it, or choose another -o"
                              ) from exc
        if isinstance(exc, OSError):
            hint = _WRITE_HINTS.get(exc.errno or 0, "choose another -o or retry")
            raise OutputError(f"cannot write {output}: {_cause(exc)} placing the files; {hint}; {kept}") from exc
        raise
    if placed is not None:
        placed.append(output)
        placed.extend(directory / name for name in names)
    dirfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _sync_directory(dirfd, output)
    finally:
        os.close(dirfd)


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


def _cause(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")
