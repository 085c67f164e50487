"""What a test needs from the machine: a skip where it is missing, a failure in CI.

In CI (``CI=true``) the README's test command has just installed everything
(scripts/install.sh). A test that would skip there means a broken install step, and a run
that passes with the viewer tests gone would hide it; so in CI each of these fails instead,
saying what is missing.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str) -> NoReturn:
    """Skip the calling test because `what` is missing here; fail it in CI."""
    if IN_CI:
        pytest.fail(f"CI=true and {what}: scripts/install.sh should have installed it",
                    pytrace=False)
    pytest.skip(what)


def module(name: str) -> ModuleType:
    """Import `name`, skipping the calling test (or module) where it is not installed."""
    if IN_CI:  # the ImportError itself says what broke
        return importlib.import_module(name)
    return pytest.importorskip(name)


def program(name: str) -> str:
    """The path of program `name`, skipping the calling test where it is not installed."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    return path


def display() -> str:
    """The X display the test draws on (pytest-xvfb starts one)."""
    value = os.environ.get("DISPLAY")
    if not value:
        missing("no display is set (pytest-xvfb starts Xvfb when it is installed)")
    return value
