"""The command line's output folder: all or nothing, and never a file it did not write in this run.

Every file of a run goes into a fresh hidden folder (inside `--out` when it exists, else inside its nearest
existing ancestor, so that the final move is a rename on one file system). Only when the whole run has
succeeded does `commit()` move them: a new `--out` appears in one rename; into an existing one each file is
hard-linked under its name, which fails rather than replace a file (`--force` replaces). A failure, Ctrl-C or
SIGTERM before that removes the hidden folder; signals wait while a commit or a cleanup is under way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from .errors import AttnHookError


#: Output folders committed in this process, latest last (a signal that arrives just after a commit must not
#: be reported as "nothing was written").
COMMITTED: list[Path] = []
INTERRUPTED: list[int] = []  # signals the command line received while it ran (set by its handler)
#: Hidden folders made in this process and not yet moved in or removed: a signal handled between the folder's
#: creation and the `with` block that cleans it up (a model load holds a Ctrl-C back for seconds, and the
#: interpreter runs the handler at the next instruction, which may be that one) leaves them to `sweep()`.
LIVE: list[tuple[int, Path]] = []  # (thread that made it, folder)


class OutputError(AttnHookError):
    """The output folder cannot be used as asked (not a folder, not writable, would replace files)."""


@contextlib.contextmanager
def signals_held():
    """SIGINT, SIGTERM and SIGHUP are held (delivered on exit) while the block runs."""
    held = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


class Output:
    """Files written into a hidden folder, moved into `out` by `commit()`; see the module docstring.

    Args:
        out: the output folder (`--out`).
        planned: the names this run will write, when known up front: a name `out` already holds is refused
            before any work (unless `force`).
        force: replace files of those names.
    """

    def __init__(self, out, planned: Sequence[str] = (), force: bool = False):
        self.out, self.force, self.committed = Path(out), force, False
        self.names: list[str] = []
        where = f"the output folder {str(self.out)!r}"
        if os.path.lexists(self.out) and not self.out.is_dir():
            what = ("a symbolic link that leads nowhere (dangling or looping)" if self.out.is_symlink()
                    and not self.out.exists() else "a file, not a folder")
            raise OutputError(f"Cannot write to {where}: it is {what}. Choose a folder with --out.")
        self.real = Path(os.path.realpath(self.out))
        if self.real.is_dir():
            base = self.real
            clash = [n for n in planned if os.path.lexists(self.real / n)]
            if clash and not force:
                raise OutputError(f"{where} already holds {len(clash)} file(s) this run would write: "
                                  f"{_listing(clash)}. Pass --force to replace them, or choose another --out.")
        else:
            base = self.real.parent
            while not base.is_dir():
                if os.path.lexists(base):
                    raise OutputError(f"Cannot write to {where}: {str(base)!r} is not a folder. Choose another --out.")
                base = base.parent
        try:
            with signals_held():  # made and listed in one go: a signal finds it in LIVE or not made
                self.tmp = _fresh_folder(base)
                LIVE.append((threading.get_ident(), self.tmp))
        except OSError as e:
            raise OutputError(f"Cannot write to {where}: {e.strerror or e} in {str(base)!r}. Choose a writable "
                              "folder with --out.") from None

    def path(self, name: str) -> Path:
        """Where to write the file `name` (a plain name, written once per run)."""
        if name in self.names or Path(name).name != name:
            raise OutputError(f"Two outputs of this run are both named {name!r}: nothing was written. Give the "
                              "inputs different names.")
        self.names.append(name)
        return self.tmp / name

    def commit(self) -> None:
        if INTERRUPTED:  # a Ctrl-C that a library swallowed (a bare except during an import): nothing is written
            raise KeyboardInterrupt
        with signals_held():
            try:
                self._move()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
                _forget(self.tmp)
            self.committed = True
            COMMITTED.append(self.out)

    def _move(self) -> None:
        if not os.path.lexists(self.real):
            self.real.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(self.tmp, self.real)
                return
            except OSError:
                if not self.real.is_dir():
                    raise
        clash = [n for n in self.names if os.path.lexists(self.real / n)]
        if clash and not self.force:
            raise OutputError(f"{str(self.out)!r} gained {len(clash)} file(s) of the names this run writes while "
                              f"it ran: {_listing(clash)}. Nothing was written; pass --force to replace them.")
        moved: list[Path] = []
        try:
            for name in self.names:
                src, dst = self.tmp / name, self.real / name
                if self.force:
                    os.replace(src, dst)
                else:
                    try:
                        os.link(src, dst)  # fails if dst exists: never replaces a file
                    except FileExistsError:
                        raise OutputError(f"{str(dst)!r} appeared while this run wrote it; nothing was written. "
                                          "Pass --force to replace it.") from None
                    except OSError:  # no hard links here (FAT, some network file systems)
                        if os.path.lexists(dst):
                            raise OutputError(f"{str(dst)!r} appeared while this run wrote it; nothing was "
                                              "written.") from None
                        os.rename(src, dst)
                moved.append(dst)
        except BaseException:
            if not self.force:
                for dst in moved:
                    with contextlib.suppress(OSError):
                        os.unlink(dst)
            raise

    def discard(self) -> None:
        with signals_held():
            shutil.rmtree(self.tmp, ignore_errors=True)
            _forget(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            try:
                self.commit()
            except OSError as e:
                raise OutputError(f"Cannot move the results into {str(self.out)!r}: {e.strerror or e}. Nothing "
                                  "was written; choose a writable folder with --out.") from None
        else:
            self.discard()


def _forget(tmp: Path) -> None:
    LIVE[:] = [entry for entry in LIVE if entry[1] != tmp]


def sweep() -> None:
    """Remove the hidden folders this thread made that no `with` block cleaned up (see `LIVE`)."""
    me = threading.get_ident()
    with signals_held():
        for entry in [e for e in LIVE if e[0] == me]:
            shutil.rmtree(entry[1], ignore_errors=True)
            LIVE.remove(entry)


def _fresh_folder(base: Path) -> Path:
    """A new hidden folder in `base`, with the mode a plain mkdir gives (0o777 less the umask)."""
    for _ in range(100):
        path = base / f".attnhook-{secrets.token_hex(6)}.tmp"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary folder name in {base}")
