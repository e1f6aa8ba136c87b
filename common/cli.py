"""How a stage script ends when something goes wrong. Every script's `__main__` runs inside
`exit_on_known_errors()`:

- a known error prints as one line, `<script>: error: <message>`, and the script exits with status 2
  (argparse's status for bad arguments). Known errors are
  1. instances of the project's own error classes (any exception class defined under common/:
     ConfigError, RunExistsError, XtremeDataError, CorpusError, ...), whose messages name the fix;
  2. ValueError and OSError (FileNotFoundError included) whose message carries "Fix:", the project's
     convention for an error that says what to do;
  3. a failed child script whose output went to the terminal (subprocess.CalledProcessError, output not
     captured): the child printed its own error already, so the parent names the command and exits with the
     child's status.
- anything else is a bug and keeps its traceback (and Python's exit status 1). KeyboardInterrupt and
  SystemExit pass through untouched.

It also quiets the libraries' own progress bars when stderr is not a terminal (a log file, `make reproduce`
piped to tee): transformers draws one per model saved or loaded ("Writing model shards", "Loading
weights"), dozens in a run, each a line of a log. Our own tqdm bars are off there already (disable=None).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from common.paths import REPO_ROOT

KNOWN_ERROR_STATUS = 2
FIX_MARKER = "Fix:"


def is_known_error(error: BaseException) -> bool:
    """Whether `error` is an expected failure with a message for the user (rules 1 and 2 above)."""
    if type(error).__module__.split(".")[0] == "common":
        return True
    return isinstance(error, (ValueError, OSError)) and FIX_MARKER in str(error)


def child_exit_status(error: subprocess.CalledProcessError) -> int:
    """The status to exit with after a child failed: its own, or 128 + signal when a signal killed it."""
    return error.returncode if error.returncode > 0 else 128 - error.returncode


def command_line() -> str:
    """This script's command as a user retypes it from the repository root: python <script> <arguments>."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO_ROOT)
    return shlex.join(["python", str(script), *sys.argv[1:]])


@contextlib.contextmanager
def exit_on_interrupt(kept: str) -> Iterator[None]:
    """Ctrl-C (SIGINT) ends the block with one line instead of a traceback: `kept` (what stays of the work
    done) and the command that runs the script again; exit status 130, 128 + SIGINT, as a shell reports a
    process that SIGINT ended."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted (Ctrl-C); {kept}. Run again with: {command_line()}",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def quiet_library_progress_bars(stream=None) -> bool:
    """Turn the Hugging Face libraries' progress bars off when `stream` (default stderr) is not a terminal;
    returns whether it did. The environment variable reaches libraries imported later and child processes
    (pretrain_all.py runs pretrain.py); the calls reach those already imported, which read it at import."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return False
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    return True


@contextlib.contextmanager
def exit_on_known_errors() -> Iterator[None]:
    script = Path(sys.argv[0]).name
    quiet_library_progress_bars()
    try:
        yield
    except subprocess.CalledProcessError as error:
        if error.stderr is not None:  # captured: nobody has seen the child's message, the traceback must stay
            raise
        print(f"{script}: error: {' '.join(map(str, error.cmd))} failed with status {error.returncode} "
              "(its message is above)", file=sys.stderr)
        raise SystemExit(child_exit_status(error)) from None
    except Exception as error:
        if not is_known_error(error):
            raise
        print(f"{script}: error: {error}", file=sys.stderr)
        raise SystemExit(KNOWN_ERROR_STATUS) from None
