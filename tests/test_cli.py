"""The command line as a whole: help, version, conventions, man pages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import ROOT, assert_one_line_error
from unetcli import __version__
from unetcli.cli import _split_global_flags, app

COMMANDS = ["weights", "augment", "train", "predict", "evaluate", "export"]


def _click_commands():
    group = typer.main.get_command(app)
    return group, {name: group.commands[name] for name in COMMANDS}


def test_version(unet):
    result = unet("--version")
    assert result.code == 0 and result.stdout.strip() == f"unet {__version__}"


def test_help_lists_every_subcommand(unet):
    result = unet("--help")
    assert result.code == 0
    for name in COMMANDS:
        assert re.search(rf"\b{name}\b", result.stdout), name


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help_with_examples(unet, name):
    result = unet(name, "--help")
    assert result.code == 0
    assert "Examples" in result.stdout and f"unet {name}" in result.stdout


def test_help_does_not_import_torch():
    code = ("import sys; from unetcli.cli import run; rc = run(['--help']); "
            "sys.stderr.write('TORCH=%s' % ('torch' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "TORCH=False" in proc.stderr
    for name in COMMANDS:
        proc = subprocess.run([sys.executable, "-c", code.replace("['--help']", f"['{name}', '--help']")],
                              capture_output=True, text=True)
        assert "TORCH=False" in proc.stderr, name


def test_python_dash_m_and_entry_point_agree(tmp_path):
    exe = Path(sys.executable).with_name("unet")
    if not exe.exists():
        pytest.skip("the unet entry point is not installed in this environment")
    a = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "unetcli", "--version"], capture_output=True, text=True)
    assert a.stdout == b.stdout and a.returncode == b.returncode == 0


def test_usage_errors_exit_2(unet):
    assert unet("no-such-command").code == 2
    assert unet("--no-such-flag").code == 2


def test_global_flags_anywhere():
    assert _split_global_flags(["predict", "a.tif", "-q", "--debug"]) == (["predict", "a.tif"], {"quiet", "debug"})
    assert _split_global_flags(["predict", "--", "-q"]) == (["predict", "--", "-q"], set())


def test_internal_errors_are_one_line_and_debug_shows_traceback(monkeypatch, capsys):
    from unetcli import cli
    from unetcli.errors import ImageReadError

    def boom():
        raise ImageReadError("x.tif: damaged", hint="fix it")

    def bug():
        raise ZeroDivisionError("oops")

    for fn, expect in ((boom, "unet: error: x.tif: damaged (hint: fix it)"), (bug, "internal error: ZeroDivisionError")):
        local = typer.Typer()
        local.command()(fn)
        monkeypatch.setattr(cli, "app", local)
        assert cli.run([]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err
        monkeypatch.setenv("UNET_DEBUG", "1")
        assert cli.run([]) == 1
        assert "Traceback" in capsys.readouterr().err
        monkeypatch.delenv("UNET_DEBUG")


def _man_text(page: Path) -> str:
    return page.read_text(encoding="utf-8").replace("\\-", "-").replace("\\fB", "").replace("\\fR", "")


def test_every_option_is_in_the_man_pages():
    group, commands = _click_commands()
    root_page = ROOT / "man" / "unet.1"
    assert root_page.is_file()
    text = _man_text(root_page)
    for param in group.params:
        for opt in param.opts:
            if opt.startswith("--") and opt not in ("--help",):
                assert opt in text, f"{opt} missing from man/unet.1"
    for name in COMMANDS:
        assert f"unet-{name}" in text, f"man/unet.1 does not refer to unet-{name}(1)"
    for name, cmd in commands.items():
        page = ROOT / "man" / f"unet-{name}.1"
        assert page.is_file(), f"man/unet-{name}.1 is missing"
        text = _man_text(page)
        for param in cmd.params:
            for opt in list(param.opts) + list(param.secondary_opts):
                if opt.startswith("--") and opt != "--help":
                    assert opt in text, f"{opt} of unet {name} missing from man/unet-{name}.1"


def test_help_shows_no_python_types(unet):
    """Flags show no '<bool>', arguments no '<list[str]>', repeated arguments one '...' (issue 15)."""
    for command in ("weights", "augment", "train", "predict", "evaluate"):
        r = unet(command, "--help", env={"COLUMNS": "200"})
        assert r.code == 0, r
        for bad in ("<bool>", "<list", "<float>", "<int>", "<text>", "...]...", "<path>"):
            assert bad not in r.stdout, (command, bad)
    assert "[IMAGE]..." in unet("predict", "--help", env={"COLUMNS": "200"}).stdout
