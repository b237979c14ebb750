"""The local session's JVM starts from the venv's class-data archive (recsys_spark.session.class_archive),
and a JVM that cannot use an archive starts anyway, silently."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from recsys_spark import session


def test_this_runs_session_maps_the_class_archive_that_setup_built(spark):
    """scripts/setup.sh built the archive (the README's test command runs it first); the driver JVM of
    this test session was told to use it and has it mapped into memory."""
    archive = session.class_archive()
    assert os.path.isfile(archive), f"{archive} is missing: run scripts/setup.sh"
    options = spark.sparkContext.getConf().get("spark.driver.extraJavaOptions")
    assert f"-XX:SharedArchiveFile={archive}" in shlex.split(options)
    pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
    maps = f"/proc/{pid}/maps"
    if not os.path.exists(maps):
        pytest.skip("no /proc here to see the JVM's memory maps")
    with open(maps) as fh:
        assert os.path.realpath(archive) in fh.read(), "the driver JVM did not map the class archive"


def test_an_archive_the_jvm_cannot_use_is_skipped_without_a_word(tmp_path, monkeypatch):
    broken = tmp_path / "classes.jsa"
    broken.write_bytes(b"not an archive")
    monkeypatch.setenv(session.CLASS_ARCHIVE_ENV, str(broken))
    options = shlex.split(session.driver_java_options())
    assert f"-XX:SharedArchiveFile={broken}" in options
    done = subprocess.run(["java", *options, "-version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "warning" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr


def test_without_an_archive_the_options_name_none(tmp_path, monkeypatch):
    monkeypatch.setenv(session.CLASS_ARCHIVE_ENV, str(tmp_path / "absent.jsa"))
    assert "SharedArchiveFile" not in session.driver_java_options()
    assert "-XX:ArchiveClassesAtExit=/x.jsa" in session.driver_java_options(archive_at_exit="/x.jsa")
