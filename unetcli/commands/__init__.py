"""One module per subcommand: options in, one call into the core, output out.

Each module defines NAME, HELP, EPILOG and ``command``; it imports torch and the heavy core modules
only inside ``command`` so that ``unet --help`` stays fast.
"""
