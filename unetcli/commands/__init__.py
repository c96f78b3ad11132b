"""One module per subcommand: options in, one call into the core, output out.

Each module defines NAME, HELP, EPILOG and ``command``; it imports torch and the heavy core modules
only inside ``command`` so that ``unet --help`` stays fast.
"""


def read_stdin() -> bytes:
    """All of stdin's bytes, for a ``-`` input: the command layer reads stdin, the core takes bytes."""
    import sys

    from unetcli.errors import ImageReadError

    try:
        return sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageReadError("<stdin>: cannot read", hint="pipe an image file into the command") from exc
