"""Shared by the tests: the repository on sys.path, a script of scripts/ loaded as a module, the
sandbox mode that code tests run in, and a bubblewrap that cannot run."""
import importlib.util
import os
import stat
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sandbox  # noqa: E402


def load_script(name):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Tests that are not about the sandbox itself score trusted programs (shipped references, honest
# answers): under bubblewrap where it runs, else in the weaker rlimit mode. The header says which.
CODE_MODE = "bwrap" if sandbox.bwrap_problem() is None else "rlimit"
BROKEN_BWRAP_ERROR = "bwrap: setting up uid map: Permission denied"  # what a locked-down container says


def pytest_terminal_summary(terminalreporter):
    """Say, last (also under -q), which sandbox the code tests ran in."""
    problem = sandbox.bwrap_problem()
    terminalreporter.write_line(f"code sandbox: {CODE_MODE} (Python {sys.executable})" + (
        f"; bubblewrap cannot run here: {problem.strip()}" if problem else ""))


def need_bwrap():
    """Skip a test that needs bubblewrap where it cannot run; under CI (CI set, as `.ci/run`
    does) fail instead: there the bubblewrap tests must run, not be skipped."""
    problem = sandbox.bwrap_problem()
    if problem:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"bubblewrap cannot run here: {problem.strip()}")


@pytest.fixture
def bwrap_required():
    need_bwrap()


@pytest.fixture
def code_mode():
    return CODE_MODE


@pytest.fixture
def broken_bwrap(tmp_path, monkeypatch):
    """A `bwrap` first on PATH that fails as in a container without namespaces; the probe's cached
    answer is forgotten for the test. Returns the error it prints."""
    fake = tmp_path / "fake-bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '{BROKEN_BWRAP_ERROR}' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(sandbox, "_PROBE", {})
    return BROKEN_BWRAP_ERROR
