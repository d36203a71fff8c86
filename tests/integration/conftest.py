"""Fixtures for the posthaste-bench integration tests.

Run inside a private network namespace (see README.md); only 127.0.0.1 and ::1 are used.
"""
import os
import shutil

import pytest

import phtest


@pytest.fixture(scope="session")
def bench():
    """Path of the posthaste-bench binary ($POSTHASTE_BUILD/bench/posthaste-bench)."""
    path = phtest.BENCH
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip("posthaste-bench is not built: %s is missing (build with `ninja -C %s` "
                    "or set POSTHASTE_BUILD)" % (path, phtest.BUILD_DIR))
    return path


@pytest.fixture
def procs(tmp_path):
    """Helper processes (Popen); leftovers are terminated/killed by PID at teardown."""
    p = phtest.Processes(tmp_path)
    yield p
    p.cleanup()


@pytest.fixture
def sink(bench, tmp_path):
    """Factory: sink(*args, host="127.0.0.1") starts `posthaste-bench sink --listen HOST:PORT *args`
    and waits until it accepts connections. s.stop() sends SIGTERM and returns the JSON stats.
    Every sink still running at teardown is terminated by PID."""
    started = []

    def start(*args, host="127.0.0.1"):
        s = phtest.Sink(bench, [str(a) for a in args], tmp_path, host=host)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture
def dialogue():
    """Factory: dialogue(sink_or_host, port=None, **kw) -> phtest.Dialogue (closed at teardown)."""
    opened = []

    def open_(target, port=None, **kw):
        if port is None:
            host, port = target.host, target.port
        else:
            host = target
        d = phtest.Dialogue(host, port, **kw)
        opened.append(d)
        return d

    yield open_
    for d in opened:
        d.close()


def need_tool(name, paths=("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")):
    p = shutil.which(name)
    if p:
        return p
    for d in paths:
        c = os.path.join(d, name)
        if os.access(c, os.X_OK):
            return c
    pytest.skip("%s is not installed" % name)


@pytest.fixture
def tool():
    """tool("swaks") -> path, or skip the test when the tool is missing."""
    return need_tool
