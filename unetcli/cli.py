"""The ``unet`` command line: the Typer app, its global flags, and the one place errors become exits.

Exit status: 0 success, 1 an error (one line on stderr: ``unet: error: <what> (hint: <how>)``),
2 a usage error or a subcommand not available yet, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

import typer

from unetcli import __version__, console
from unetcli.commands import augment, evaluate, predict, train, weights
from unetcli.errors import UnetError

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
for module in (weights, augment, train, predict, evaluate):
    app.command(module.NAME, help=module.HELP, epilog=module.EPILOG,
                context_settings=getattr(module, "CONTEXT", None))(module.command)


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


ARGV: list[str] = ["unet"]    # the command line being run (recorded in provenance files)


def run(args: list[str]) -> int:
    """Run the command line on ``args``; return the exit status instead of exiting."""
    global ARGV
    ARGV = ["unet", *map(str, args)]
    args, flags = _split_global_flags(args)
    debug = "debug" in flags or os.environ.get("UNET_DEBUG", "") not in ("", "0")
    console.set_level(quiet="quiet" in flags, verbose="verbose" in flags)
    command = typer.main.get_command(app)
    try:
        # standalone mode: Typer prints usage errors itself (exit 2) and turns --help into exit 0.
        command.main(args=args, prog_name="unet", standalone_mode=True)
        return 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        console.error("unet: interrupted")
        return 130
    except UnetError as exc:
        if debug:
            traceback.print_exc()
        console.error(f"unet: error: {exc.one_line()}")
        return getattr(exc, "exit_code", 1)
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug: say so in one line, with the traceback on request
        if debug:
            traceback.print_exc()
        detail = " ".join(str(exc).split())[:300]
        console.error(f"unet: error: internal error: {type(exc).__name__}: {detail} "
                      "(hint: rerun with --debug and report it)")
        return 1


def main() -> None:
    """Entry point of the ``unet`` executable."""
    sys.exit(run(sys.argv[1:]))
