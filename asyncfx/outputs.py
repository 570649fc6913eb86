"""Output files (plans, profiles, figures, images): checked before the work that makes
them, and written atomically under the name given, in the format its suffix names."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Collection, Iterator

from asyncfx.errors import OutputError


def check_output(path: str | os.PathLike, suffixes: Collection[str] | None = None,
                 what: str = "file") -> None:
    """Raise OutputError unless ``path`` can be written: not a folder, in a folder that
    exists and takes a new file (tried), with one of ``suffixes`` (lower case, with the
    dot; None: any).

    Example:
        >>> check_output("plan.png", {".png", ".pdf"}, "figure")
        >>> check_output("plan.txt", {".png", ".pdf"}, "figure")
        Traceback (most recent call last):
        OutputError: cannot write the figure 'plan.txt': ...
    """
    where = f"cannot write the {what} {os.fspath(path)!r}"
    if os.path.isdir(path):
        raise OutputError(f"{where}: it is a folder; give a file name in it.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{where}: folder {folder!r} does not exist.")
    suffix = os.path.splitext(path)[1].lower()
    if suffixes is not None and suffix not in suffixes:
        named = f"its suffix {suffix!r}" if suffix else "it has no suffix, which"
        raise OutputError(f"{where}: {named} names no format it can be written in; use one of "
                          f"{', '.join(sorted(suffixes))}.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"{where}: folder {folder!r} does not take new files ({exc.strerror}).") from None


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "file") -> Iterator[str]:
    """Yield a temporary path next to ``path`` with the same suffix (so a writer that
    picks its format by suffix picks ``path``'s); once written it replaces ``path``, and a
    failed write leaves no file. An OSError names ``path``, never the temporary one.

    Example:
        >>> with writing("plan.pdf", "figure") as temporary:
        ...     figure.savefig(temporary)
    """
    folder = os.path.dirname(os.path.abspath(path))
    base, suffix = os.path.splitext(os.path.basename(path))
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=suffix)
        os.close(handle)
        yield temporary
        os.replace(temporary, path)
    except OSError as exc:
        raise OutputError(f"cannot write the {what} {os.fspath(path)!r}: {exc.strerror or exc}.") from exc
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
