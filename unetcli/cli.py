"""The ``unet`` command line: the Typer app, its global flags, and the one place errors become exits.

Exit status: 0 success, 1 an error (one line on stderr: ``unet: error: <what> (hint: <how>)``),
2 a usage error, 130 interrupted (Ctrl-C), 141 a broken pipe
on stdout (quietly), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer

from unetcli import __version__, console
from unetcli.commands import augment, evaluate, export, predict, train, weights
from unetcli.errors import UnetError

def _help_type(param, ctx, shown):
    """What the help shows beside an option: its metavar, or its type as click names it (FLOAT,
    INTEGER, TEXT); nothing for an on/off flag or an argument, whose name is shown already (typer
    0.2x would print '<bool>', '<float>' and '<list[str]>' there)."""
    import typer.core as tcore

    if isinstance(param, tcore.TyperArgument) or getattr(param, "is_flag", False):
        return None
    if param.metavar is not None:
        return param.metavar
    label = shown(param, ctx)
    return label.strip("<>").upper() if isinstance(label, str) else label


def _patch_help() -> None:
    import typer.core as tcore

    for cls in (tcore.TyperOption, tcore.TyperArgument):
        cls.display_type_rich = lambda self, ctx, _shown=cls.display_type_rich: _help_type(self, ctx, _shown)


_patch_help()

app = typer.Typer(
    name="unet",
    help="The U-Net of Ronneberger, Fischer and Brox (2015) for the command line: weight maps, "
         "augmentation, training, overlap-tile prediction and evaluation of biomedical image "
         "segmentation.",
    epilog="Run 'unet COMMAND --help' for a command's options and examples; 'man unet' for more. "
           "-q/--quiet, -v/--verbose and --debug may also be given after the command.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The subcommands, in the order a user meets them.
for module in (weights, augment, train, predict, evaluate, export):
    app.command(module.NAME, help=module.HELP, epilog=module.EPILOG)(module.command)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"unet {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and data."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print more about what happens."),
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors (or set UNET_DEBUG=1)."),
) -> None:
    """Global flags; they are applied in main() so that they work after the subcommand too."""


_GLOBAL_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose",
                 "--debug": "debug"}


def _split_global_flags(args: list[str]) -> tuple[list[str], set[str]]:
    """Remove -q/-v/--debug wherever they stand (before a '--'); return the rest and the flags seen."""
    rest, seen = [], set()
    for i, arg in enumerate(args):
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg in _GLOBAL_FLAGS:
            seen.add(_GLOBAL_FLAGS[arg])
        else:
            rest.append(arg)
    return rest, seen


def run(args: list[str]) -> int:
    """Run the command line on ``args``; return the exit status instead of exiting.

    0 success; 1 an error, one line on stderr; 2 a usage error; 130 interrupted (Ctrl-C);
    141 stdout's reader went away (a broken pipe, quietly); 143 terminated (SIGTERM).
    """
    from unetcli import guards

    exits, aborts, usage_errors = _click_exceptions()

    argv = ["unet", *map(str, args)]    # the command line as given, global flags included
    args, flags = _split_global_flags(args)
    debug = "debug" in flags or os.environ.get("UNET_DEBUG", "") not in ("", "0")
    console.set_level(quiet="quiet" in flags, verbose="verbose" in flags)
    original_stdout = sys.stdout
    # a failed write to stdout (closed: `>&-`, full: `>/dev/full`) becomes one line, not a traceback
    sys.stdout = _GuardedStream(_ClosedStdout() if sys.stdout is None else sys.stdout)
    command = typer.main.get_command(app)
    try:
        previous_term = guards.raise_on_sigterm()
    except ValueError:               # not the main thread: leave signals alone
        previous_term = None
    try:
        with warnings.catch_warnings(), _one_line_logging():
            warnings.simplefilter("default")
            warnings.showwarning = _warning_line
            # Not click's standalone mode: it would turn Ctrl-C into a silent exit 130 and a broken
            # pipe into exit 1 before we could see them.
            command._main_shell_completion({}, "unet", None)
            # the command line travels to the commands as the context's obj (for provenance records)
            with command.make_context("unet", list(args), obj={"argv": argv}) as ctx:
                command.invoke(ctx)
            sys.stdout.flush()       # a full or closed stdout fails here, not at interpreter exit
        return 0
    except exits as exc:
        return exc.exit_code
    except usage_errors as exc:
        _show_usage_error(command, exc)
        return exc.exit_code
    except (KeyboardInterrupt, *aborts):
        console.error("unet: interrupted")
        return 130
    except guards.Terminated:
        console.error("unet: terminated (SIGTERM)")
        return guards.Terminated.exit_code
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except UnetError as exc:
        if debug:
            traceback.print_exc()
        console.error(f"unet: error: {exc.one_line()}")
        return getattr(exc, "exit_code", 1)
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not an error of ours; say nothing.
        _stdout_to_devnull()
        return 141
    except _StdoutError as exc:
        _stdout_to_devnull()
        console.error(f"unet: error: {exc.one_line()}")
        return 1
    except Exception as exc:  # a bug: say so in one line, with the traceback on request
        return _internal_error(exc, debug)
    finally:
        sys.stdout = original_stdout
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(exit, abort, usage error) exception classes: Typer's own (recent Typer vendors click as
    ``typer.core._click``, and click itself need not be installed) and click's where it is."""
    from typer import core

    modules = [m for m in (getattr(core, "_click", None),) if m is not None]
    try:
        import click

        modules.append(click)
    except ImportError:
        pass
    def found(name: str) -> set:
        return {cls for m in modules if (cls := getattr(m.exceptions, name, None)) is not None}

    exits = {typer.Exit, *found("Exit")}
    aborts = {typer.Abort, *found("Abort")}
    usage = found("ClickException")
    return tuple(exits), tuple(aborts), tuple(usage)


def _internal_error(exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    detail = " ".join(str(exc).split())[:300]
    console.error(f"unet: error: internal error: {type(exc).__name__}: {detail} "
                  "(hint: rerun with --debug and report it)")
    return 1


def _show_usage_error(command, exc) -> None:
    """A usage error the way Typer shows it in standalone mode (a boxed message when rich is there)."""
    from typer import core

    if getattr(core, "HAS_RICH", False) and getattr(command, "rich_markup_mode", None) is not None:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
    else:
        exc.show()


class _ClosedStdout(io.TextIOBase):
    """Stands in for a closed stdout: writing data to it is an error, merely running is not."""

    class _Buffer(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise OSError(errno.EBADF, "stdout is closed")

    def __init__(self):
        super().__init__()
        self.buffer = self._Buffer()

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        raise OSError(errno.EBADF, "stdout is closed")

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "stdout is closed")


class _StdoutError(UnetError):
    default_hint = "stdout carries the data: redirect it to a file on a disk with space, or give -o FILE"


class _GuardedStream:
    """stdout (or its binary buffer) during a run: a failed write or flush raises _StdoutError.

    A broken pipe stays a BrokenPipeError (exit 141, quietly); everything else is delegated.
    """

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _guard(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise _StdoutError(f"cannot write to stdout ({reason})") from exc

    def write(self, data):
        return self._guard(self._stream.write, data)

    def writelines(self, lines):
        return self._guard(self._stream.writelines, lines)

    def flush(self):
        return self._guard(self._stream.flush)

    @property
    def buffer(self):
        return _GuardedStream(self._stream.buffer)


def _stdout_to_devnull() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's last flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (numpy, tifffile, torch...) as one ``unet: warning:`` line."""
    text = " ".join(str(message).split())
    parts = Path(str(filename)).parts
    source = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p in ("site-packages", "dist-packages")),
                  None)
    if source is not None:
        source = source.split(".")[0]
        text = f"{source}: {text}"
    console.error(f"unet: warning: {text}")


class _OneLineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:
            text = str(record.msg)
        console.error(f"unet: warning: {record.name.split('.')[0]}: {text}")


@contextlib.contextmanager
def _one_line_logging():
    """Third-party log records of level WARNING and above (tifffile logs its complaints) as one line."""
    root = logging.getLogger()
    handler = _OneLineHandler(logging.WARNING)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def main() -> None:
    """Entry point of the ``unet`` executable."""
    sys.exit(run(sys.argv[1:]))
