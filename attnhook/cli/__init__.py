"""The `attnhook` command.

One module per subcommand (`demo`, `caption`, `inspect`, `render`, `explain`), each with `add(subparsers)`,
which declares its arguments, its two usage examples and `run`, a function `(args) -> int`; `_common` holds what
they share and `_models` loads the models they run. To add a subcommand, write its module and list it in
`_COMMANDS`. Errors a user can cause (`AttnHookError`) print one line on stderr and exit 1; argparse's usage
errors exit 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import AttnHookError
from . import caption, demo, explain, inspect, render
from ._common import say as _say

# --- the command -----------------------------------------------------------------------------------------------
_COMMANDS = [demo.add, caption.add, inspect.add, render.add, explain.add]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `attnhook` command, with every subcommand."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="attnhook", description="See where an image-captioning model looks "
                                                                   "for every word it writes.")
    parser.add_argument("--version", action="version", version=f"attnhook {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `attnhook` command; returns its exit status.

    Every failure is one line on stderr: 1 for an error (a user error names the fix; anything else names the
    exception, and `ATTNHOOK_TRACEBACK=1` shows where), 130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP.
    An output folder is all or nothing: a failed or interrupted run leaves no file and no temporary folder.

    Example:
        >>> main(["explain", "1,8,12,197", "--image-size", "224x224"])    # doctest: +ELLIPSIS
        shape (1, 8, 12, 197) read as (batch, heads, queries, keys)...
        keys: 197 = 1 CLS + 14 x 14 patches of 16 px on 224 x 224 px
        ...
        0
    """
    from .._output import INTERRUPTED

    seen = len(INTERRUPTED)
    try:
        code = _main(argv)
        if INTERRUPTED[seen:]:
            _quiet_exit(argv)
        return code
    except KeyboardInterrupt:
        # a Ctrl-C the interpreter delivered after the command's own handler was removed: the command stops
        # with the status of Ctrl-C, saying so once, and (run as the program) ignores any later one on its way out
        from .._output import sweep

        sweep()
        if not INTERRUPTED[seen:]:
            _say("attnhook: stopped by Ctrl-C.")
        _quiet_exit(argv)
        _forget_handled_interrupt()
        return 130


def _forget_handled_interrupt() -> None:
    """A quirk of CPython (seen on 3.11.7): a KeyboardInterrupt raised inside code that `exec` ran from a string
    (dataclasses and namedtuples build their methods so, during an import) sets the interpreter's "unhandled
    KeyboardInterrupt" flag even when it is caught, and `python -m attnhook` then exits by SIGINT instead of with
    the status `main()` returns. Running any string through `exec` clears the flag."""
    exec("None")


def _quiet_exit(argv) -> None:
    """Run as the program (no argv given): a signal after the command ended no longer kills the exit status."""
    import signal
    import threading

    if argv is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv: list[str] | None) -> int:
    import os

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    name = f"attnhook {args.command}"
    from .._output import COMMITTED

    done = len(COMMITTED)
    with _signals_as_interrupts():
        try:
            return args.run(args)
        except AttnHookError as e:
            message = " ".join(line.strip() for line in str(e).splitlines())
            _say(f"{name}: error: {message}")
            return 1
        except KeyboardInterrupt as e:
            from .._output import INTERRUPTED, sweep

            sweep()  # a hidden folder made just before the signal was handled, outside its `with` block
            _forget_handled_interrupt()
            signum = e.signum if isinstance(e, _Signalled) else (INTERRUPTED[-1] if INTERRUPTED else 2)
            import signal

            from .._output import COMMITTED

            what = "Ctrl-C" if signum == 2 else signal.Signals(signum).name
            if COMMITTED[done:]:  # the signal came while the results were being moved in: they all were
                _say(f"{name}: stopped by {what} after all results were written to {COMMITTED[-1]}/.")
            else:
                _say(f"{name}: stopped by {what}; nothing was written (no output folder, no temporary files).")
            return 128 + signum
        except Exception as e:  # noqa: BLE001 -- one line, not a traceback, for every failure
            from .._output import sweep

            sweep()
            if os.environ.get("ATTNHOOK_TRACEBACK"):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            kind = "out of memory" if isinstance(e, MemoryError) else type(e).__name__
            hint = (f" ({e.strerror})" if isinstance(e, OSError) and e.strerror and e.strerror not in first else "")
            _say(f"{name}: error: {kind}: {first}{hint}. Nothing was written. Set ATTNHOOK_TRACEBACK=1 to see "
                 "where it happened.")
            return 1


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _signals_as_interrupts():
    """While the command runs, SIGTERM and SIGHUP raise `_Signalled` (as Ctrl-C raises KeyboardInterrupt);
    handlers a caller installed, or signals it ignores, are left alone. Main thread only."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def installed():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {}

        from .._output import INTERRUPTED

        def raise_(signum, frame):
            INTERRUPTED.append(signum)
            raise _Signalled(signum)

        def interrupt(signum, frame):
            INTERRUPTED.append(signum)  # remembered, in case a library's bare except swallows the interrupt
            raise KeyboardInterrupt

        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            old[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)

        for n in ("SIGTERM", "SIGHUP"):
            num = getattr(signal, n, None)
            if num is not None and signal.getsignal(num) is signal.SIG_DFL:
                old[num] = signal.signal(num, raise_)
        try:
            yield
        finally:
            for num, handler in old.items():
                signal.signal(num, handler)

    return installed()


if __name__ == "__main__":
    sys.exit(main())
