"""Environment failures (read-only folder, full disk, a file where a folder should be)
as bad input: one line naming the path and the OS reason, exit status 2.

`check_writable` probes an output folder with a real temporary file before long
work starts: permission bits cannot tell a read-only mount or a full disk, and
as root they tell nothing at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from segdeploy.errors import SegdeployError


def check_writable(folder: str | os.PathLike, option: str) -> None:
    """SegdeployError unless a file can be created in `folder` (or where it will be created).

    Creates nothing but the probe file, which is removed: a folder that does not
    exist yet is probed in its nearest existing parent.
    """
    folder = Path(folder).absolute()
    probe_in = folder
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise SegdeployError(
            probe_in, f"is a file, so {option} {folder} cannot be created under it"
        )
    try:
        with tempfile.TemporaryFile(dir=probe_in, prefix=".segdeploy-probe-") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise SegdeployError(probe_in, f"cannot write {option} here: {reason(err)}") from None


def reason(err: OSError) -> str:
    """The OS's words for `err` ("No space left on device"), without the path."""
    if err.strerror:
        return err.strerror
    return os.strerror(err.errno) if err.errno else str(err)


def is_environment_error(err: BaseException) -> bool:
    """An OSError that the user's machine caused (disk, permissions, paths), not a bug."""
    return isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS


def as_input_error(err: OSError, where: str | os.PathLike, note: str = "") -> SegdeployError:
    """SegdeployError naming the file the OS named (else `where`) and the OS reason."""
    path = err.filename if err.filename else where
    return SegdeployError(path, reason(err) + (f"; {note}" if note else ""))


@contextlib.contextmanager
def environment_errors_as_input(where: str | os.PathLike, note: str = "") -> Iterator[None]:
    """Write failures in the block that the machine caused become SegdeployError.

    An environment OSError names its file and reason. Libraries often hide a full
    disk behind their own error (torch.save: "RuntimeError: ... unexpected pos");
    then `where` is probed with a real write, and if the OS refuses it (no space,
    read-only) that reason is the message. Any other error passes unchanged.
    """
    try:
        yield
    except SegdeployError:
        raise
    except OSError as err:
        if not is_environment_error(err):
            raise
        raise as_input_error(err, where, note) from None
    except Exception as err:
        try:
            check_writable(where, "files")
        except SegdeployError as probe:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            tail = f"; {note}" if note else ""
            raise SegdeployError(
                where, f"{probe.problem.split(': ', 1)[-1]} (writing failed: {first}){tail}"
            ) from err
        raise


_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
    errno.EEXIST,
    errno.EIO,
    errno.EFBIG,
    errno.ENAMETOOLONG,
}
