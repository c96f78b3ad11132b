"""unetcli.provenance: one rule each for hashes, time, versions and the command line."""

from __future__ import annotations

import datetime
import hashlib
import io

import numpy as np

from unetcli import __version__, provenance


def test_file_hash_is_sha256_of_every_byte_in_chunks(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 3 * 1000 + 17, dtype=np.uint8).tobytes()
    (tmp_path / "f.bin").write_bytes(data)
    monkeypatch.setattr(provenance, "CHUNK", 1000)          # several chunks and a short last one
    assert provenance.sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    assert provenance.sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    stream = io.BytesIO(data)
    stream.seek(10)
    assert provenance.sha256_stream(stream, limit=2500) == hashlib.sha256(data[10:2510]).hexdigest()


def test_utc_now_is_iso_8601_to_the_second_in_utc():
    text = provenance.utc_now()
    stamp = datetime.datetime.fromisoformat(text)
    assert stamp.utcoffset() == datetime.timedelta(0) and stamp.microsecond == 0
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 5


def test_command_line_is_quoted_as_a_shell_needs_and_stamp_records_it():
    assert provenance.command_line(["unet", "predict", "my scan.tif", "-o", "it's.png"]) == \
        "unet predict 'my scan.tif' -o 'it'\"'\"'s.png'"
    assert provenance.command_line("unet train x") == "unet train x"
    assert provenance.command_line(None) is None
    stamp = provenance.stamp(["unet", "train"])
    assert stamp["unet_version"] == __version__ and stamp["command"] == "unet train" and "created" in stamp
    assert "command" not in provenance.stamp()


def test_environment_names_versions_without_importing_the_packages():
    env = provenance.environment(("numpy", "no-such-package-xyz"))
    assert env["unet"] == __version__ and env["numpy"] == np.__version__
    assert env["no-such-package-xyz"] is None and env["python"] and env["platform"]
