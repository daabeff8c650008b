"""The two kinds of failure a user should read as one line rather than a traceback, and the wrapper every command
line entry point runs in.

    InputError  bad input (a recipe key, a dataset row, a path): names the file/row/field and what to do; exit 2
    RunError    a run that cannot go on (a non-finite loss or gradient norm); says the step and the term; exit 1
    Stopped     a run told to stop (SIGTERM, SIGUSR1, a stop file) that saved a checkpoint to resume from; exit 3

`--debug` on the command line (removed before the arguments are parsed) or REPRPO_DEBUG=1 shows the full
traceback instead. Any other exception is a bug and always shows its traceback.
"""

import functools
import os
import sys

DEBUG_FLAG, DEBUG_ENV = "--debug", "REPRPO_DEBUG"


class InputError(ValueError):
    """Bad input from the user, named precisely; the command line prints it as one line and exits with 2."""

    exit_code = 2


class RunError(RuntimeError):
    """Training stopped for a reason the user must act on; the command line prints it as one line, exit 1."""

    exit_code = 1


class Stopped(RunError):
    """Training stopped on request after saving a complete checkpoint; resume it with --resume_from_checkpoint auto."""

    exit_code = 3


def command(main):
    """Wrap an entry point `main(argv)`: InputError -> `error: <message>` on stderr and exit 2, RunError -> the
    same with exit 1 (Stopped: 3); the traceback only with --debug or REPRPO_DEBUG=1."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        before = os.environ.get(DEBUG_ENV)
        if DEBUG_FLAG in argv:  # a subcommand's own wrapper (reprpo <command> ...) sees it too
            os.environ[DEBUG_ENV] = "1"
        try:
            return main([arg for arg in argv if arg != DEBUG_FLAG])
        except (InputError, RunError) as error:
            if debug:
                raise
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            raise SystemExit(error.exit_code) from None
        finally:
            if DEBUG_FLAG in argv and before is None:
                del os.environ[DEBUG_ENV]
            elif DEBUG_FLAG in argv:
                os.environ[DEBUG_ENV] = before

    return wrapped
