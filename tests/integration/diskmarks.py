"""Disk content marks read and written with ``qemu-io`` (through QEMU's own drivers, so a qcow2 file, a raw file
or an RBD image given as QEMU's ``rbd:`` location alike): a 64 KiB pattern at an offset.

A helper module, not a test module: test modules import it (never each other)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

MIB = 1024**2
MARK = 64 * 1024


def qemu_io(fmt: str, location: str, command: str) -> str:
    if shutil.which("qemu-io") is None:
        pytest.skip(reason="qemu-io is not installed (Debian package qemu-utils)")
    result = subprocess.run(["qemu-io", "-f", fmt, "-c", command, location], capture_output=True, text=True,
                            timeout=120)
    return result.stdout + result.stderr


def write(fmt: str, location: str, pattern: int, offset: int = MIB) -> None:
    output = qemu_io(fmt, location, f"write -P {pattern:#x} {offset} {MARK}")
    assert "wrote" in output, output


def holds(fmt: str, location: str, pattern: int, offset: int = MIB) -> bool:
    output = qemu_io(fmt, location, f"read -P {pattern:#x} {offset} {MARK}")
    if "Pattern verification failed" in output:
        return False
    assert "read" in output, output
    return True
