"""``python -m unetcli``: the same as the ``unet`` executable."""

from unetcli.cli import main

if __name__ == "__main__":
    main()
