"""Run an untrusted Python program against test cases in a separate, limited process (docs/ALGORITHM.md §9.2).

The code verifier's engine. Nothing here imports torch or the model code: the training process
calls `run_tests`, which starts this same file as a *runner* in a fresh process (inside bubblewrap
when `bwrap` works, else a plain subprocess), sends it the program and the tests on stdin, and
reads one JSON result from its stdout. The runner starts the program once per test case, each
time in a fresh process with resource limits, and compares its output with the expected one.
The program never sees the expected outputs, so it cannot print them.

Layers, outermost first:
  1. The training process: a wall-clock limit for the whole sample; on expiry, or always at the
     end, SIGKILL to the runner's process group and to every process left in its session.
  2. bubblewrap (`mode="bwrap"`): new PID, network, IPC, UTS and cgroup namespaces; a read-only
     view of /usr and of the Python installation only (no /home, /root, /work, /etc); a private
     size-limited tmpfs for /tmp and for the working directory; an empty environment; no
     capabilities except the three the runner needs to drop privileges and kill; death with
     its parent. Without bwrap (`mode="rlimit"`) the runner is a plain subprocess in a fresh
     temporary directory that is removed afterwards, with a warning logged once.
  3. The runner: per test, a fresh process in its own process group, as an unused uid of its
     own (one per sample, so samples running side by side share no process count) when the
     runner is root (root ignores RLIMIT_NPROC), with RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
     RLIMIT_NPROC and no core files; a wall-clock limit and a cap on stdout/stderr; afterwards
     SIGKILL to its process group and to any orphan (the runner is a child subreaper).

Test cases use the APPS/TACO format of PRIME's code data: `{"inputs": [...], "outputs": [...]}`
for stdin/stdout programs, plus `"fn_name"` for call-based ones (`inputs[i]` is the argument
list; a LeetCode-style `class Solution` method is found too). Output comparison follows those
datasets: whitespace-insensitive lines, then tokens with a numeric tolerance.

Run as a script it is the runner (`python -I -S sandbox.py`, payload on stdin). No torch.
"""
import ctypes
import json
import math
import os
import random
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
UID_RANGE = (200_000, 260_000)  # unused uids: a root runner runs each sample's program as one of them
CALL_MARK = "\x00prime-result\x00"  # prefix of the call-based harness's result line


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program (all tests of one response)."""
    test_timeout: float = 5.0  # wall seconds per test case (ALGORITHM.md §9.2: 5 s)
    sample_timeout: float = 30.0  # wall seconds for all tests of one response; later tests fail
    memory_mb: int = 1024  # RLIMIT_AS of the program, MiB
    file_mb: int = 16  # RLIMIT_FSIZE: the largest file the program may write, MiB
    max_procs: int = 32  # RLIMIT_NPROC: processes and threads of the program's user
    output_bytes: int = 1 << 20  # cap on the program's stdout (and stderr) per test
    tmpfs_mb: int = 64  # size of the private /tmp and working directory under bwrap
    mode: str = "auto"  # "bwrap", "rlimit" (plain subprocess), or "auto" (bwrap if it works)


# ---------------------------------------------------------------------------------------------
# Shared by both sides: read a child's output with a cap and a deadline, then kill its group.
# ---------------------------------------------------------------------------------------------
def kill_group(pid):
    """SIGKILL the process group led by `pid` (call before reaping the leader: its pid, hence
    the group id, cannot be reused while it is an unreaped zombie)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def communicate_capped(proc, data, timeout, cap):
    """Feed `data` to stdin; read stdout and stderr (at most `cap` bytes each) until the process
    exits or `timeout` seconds pass. Always kills the process group and reaps the process.

    Returns (stdout bytes, stderr bytes, status) with status "ok", "timeout" or "output_limit".
    Example: communicate_capped(Popen(["cat"], ...), b"hi", 1, 100) -> (b"hi", b"", "ok")
    """
    deadline = time.monotonic() + timeout
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    status, pending = "ok", memoryview(data)
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while status == "ok" and len(sel.get_map()):
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(left):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        pending = pending[os.write(f.fileno(), pending[:1 << 16]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the program stopped reading: that is its right
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), 1 << 16)
                if not chunk:
                    sel.unregister(f)
                    continue
                bufs[f] += chunk
                if len(bufs[f]) > cap:
                    status = "output_limit"
    if status == "ok":  # both pipes closed; the process may still be running
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = "timeout"
    kill_group(proc.pid)  # also any background children left in the group
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f and not f.closed:
            f.close()
    return bytes(bufs[proc.stdout][:cap]), bytes(bufs[proc.stderr][:cap]), status


# ---------------------------------------------------------------------------------------------
# Output comparison, APPS/TACO style (runs inside the runner, which alone holds the outputs).
# ---------------------------------------------------------------------------------------------
def _close(a, b, tol=1e-6):
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if math.isnan(x) or math.isnan(y):
        return False
    return math.isclose(x, y, rel_tol=tol, abs_tol=tol)


def stdout_matches(got, expected):
    """Same output up to whitespace: equal lines after stripping (blank lines ignored), or equal
    whitespace-separated tokens where each pair is the same string or the same number (1e-6).

    Example: stdout_matches("1 2\\n3.0000001\\n\\n", "1 2\\n3") -> True
    """
    if isinstance(expected, list):  # some datasets store the expected output as lines
        expected = "\n".join(map(str, expected))
    lines = lambda s: [ln.strip() for ln in str(s).strip().splitlines() if ln.strip()]
    if lines(got) == lines(expected):
        return True
    a, b = str(got).split(), str(expected).split()
    return len(a) == len(b) and all(x == y or _close(x, y) for x, y in zip(a, b))


def _same_value(got, expected):
    if isinstance(got, bool) or isinstance(expected, bool):
        return got is expected or got == expected and type(got) is type(expected)
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        return got == expected or _close(got, expected)
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(_same_value(x, y) for x, y in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(_same_value(got[k], expected[k]) for k in got)
    return got == expected


def value_matches(got, expected):
    """Call-based results: equal after a JSON round trip (tuples become lists), numbers within
    1e-6; APPS often wraps the expected value in a one-element list, so that matches too.

    Example: value_matches([1, 2], [[1, 2]]) -> True; value_matches(0.1 + 0.2, 0.3) -> True
    """
    return _same_value(got, expected) or (isinstance(expected, list) and len(expected) == 1
                                          and _same_value(got, expected[0]))


# ---------------------------------------------------------------------------------------------
# The runner: executed inside the sandbox, one fresh process per test case.
# ---------------------------------------------------------------------------------------------
# Call-based tests: load the program as a module, call the function, print the JSON result
# after a marker on the real stdout (the program's own prints go to a throwaway buffer).
HARNESS = r"""
import io, json, os, sys
real = os.fdopen(os.dup(1), "w")
name, args = json.loads(sys.stdin.read())
sys.stdin = io.StringIO()
sys.stdout = io.StringIO()
ns = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
fn = ns.get(name)
if fn is None and "Solution" in ns:
    fn = getattr(ns["Solution"](), name)
if fn is None:
    raise NameError(f"no function {name!r} in the program")
out = json.dumps(fn(*args))
real.write(MARK + out + "\n")
real.flush()
""".replace("MARK", repr(CALL_MARK))


def _libc_prctl(option, arg):
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        return -1


def _child_setup(limits, uid):
    """preexec for a test process (the runner is single-threaded, so preexec is safe here)."""
    cpu = math.ceil(limits["test_timeout"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_procs"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid:  # root ignores RLIMIT_NPROC and may kill the runner: become an unprivileged uid
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _kill_orphans():
    """SIGKILL and reap every remaining child of the runner (orphans reparent to it: subreaper)."""
    for _ in range(100):
        me, kids = str(os.getpid()), []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:  # state ppid ...
                        kids.append(int(pid))
            except (OSError, IndexError, ValueError):
                continue
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _classify(rc, err, status):
    """A failed run's reason, or None when the process exited 0 within its limits."""
    if status != "ok":
        return status  # "timeout" (wall clock) or "output_limit"
    if b"MemoryError" in err:
        return "memory"  # RLIMIT_AS made an allocation fail
    if rc == -signal.SIGXCPU:
        return "timeout"  # RLIMIT_CPU
    return "runtime_error" if rc != 0 else None


def run_one(inp, expected, fn_name, limits, uid):
    """One test case in a fresh process. Returns "pass", "wrong", "timeout", "memory",
    "output_limit" or "runtime_error"."""
    if fn_name is None:
        argv, data = [sys.executable, "-I", "-S", "solution.py"], inp
        data = "\n".join(map(str, data)) if isinstance(data, list) else str(data)
    else:
        argv, data = [sys.executable, "-I", "-S", "-c", HARNESS], json.dumps([fn_name, inp])
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": os.getcwd()}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, process_group=0, preexec_fn=lambda: _child_setup(limits, uid))
    except OSError:
        return "runtime_error"
    out, err, status = communicate_capped(proc, data.encode(), limits["test_timeout"], limits["output_bytes"])
    _kill_orphans()
    bad = _classify(proc.returncode, err, status)
    if bad:
        return bad
    if fn_name is None:
        return "pass" if stdout_matches(out.decode("utf-8", "replace"), expected) else "wrong"
    lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.startswith(CALL_MARK)]
    if not lines:
        return "runtime_error"  # exited before returning (sys.exit in the program, say)
    try:
        got = json.loads(lines[-1][len(CALL_MARK):])
    except ValueError:
        return "wrong"
    return "pass" if value_matches(got, expected) else "wrong"


def runner_main():
    """Entry point inside the sandbox: payload on stdin, one JSON line on stdout."""
    payload = json.loads(sys.stdin.read())
    limits, tests = payload["limits"], payload["tests"]
    _libc_prctl(4, 0)  # PR_SET_DUMPABLE 0: a program running as our uid cannot ptrace us or open /proc/<us>/fd
    _libc_prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphaned grandchildren come to us to be killed
    try:
        compile(payload["program"], "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        print(json.dumps({"error": "syntax_error"}))
        return
    uid = payload.get("uid") if os.getuid() == 0 else None
    os.chmod(".", 0o777 if uid else 0o700)  # the program's uid may write its own files here
    with open("solution.py", "w") as f:
        f.write(payload["program"])
    os.chmod("solution.py", 0o644)
    deadline = time.monotonic() + limits["sample_timeout"]
    results = []
    for inp, expected in zip(tests["inputs"], tests["outputs"]):
        if time.monotonic() + 0.05 > deadline:
            results.append("timeout")  # the sample's budget is spent: the rest count as failed
            continue
        lim = {**limits, "test_timeout": min(limits["test_timeout"], deadline - time.monotonic())}
        results.append(run_one(inp, expected, tests.get("fn_name"), lim, uid))
    print(json.dumps({"results": results}))


# ---------------------------------------------------------------------------------------------
# The training-process side: start the runner in bubblewrap (or a plain subprocess) and wait.
# ---------------------------------------------------------------------------------------------
_MODE = {}  # cache: the sandbox mode that works on this machine
_MODE_LOCK = threading.Lock()


def _python_roots():
    """Folders that hold the Python installation (a venv has two)."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    return sorted(r for r in roots if not r.startswith("/usr/") and r != "/usr")


def bwrap_argv(limits, command=None):
    """The bubblewrap command line that starts the runner (or `command`): what it can see and do."""
    size = str(limits.tmpfs_mb << 20)
    argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr"]
    if os.geteuid() == 0:  # root: no user namespace (the runner must be able to change uid)
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    else:  # an ordinary user needs a user namespace for the others
        argv += ["--unshare-user"]
    for d in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for root in _python_roots():
        parents, p = [], os.path.dirname(root)
        while p != "/":
            parents.insert(0, p)
            p = os.path.dirname(p)
        for p in parents:  # bwrap would copy a 0700 /root; the program's uid must pass through
            argv += ["--perms", "0755", "--dir", p]
        argv += ["--ro-bind", root, root]
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
             "--size", size, "--tmpfs", "/sandbox", "--ro-bind", os.path.join(HERE, "sandbox.py"), "/runner/sandbox.py",
             "--chdir", "/sandbox", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
             "--"]
    return argv + (command or [sys.executable, "-I", "-S", "/runner/sandbox.py"])


def _world_traversable(path):
    """Can any user reach `path` (every folder on the way has o+x)?"""
    path = os.path.realpath(path)
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def sandbox_mode(requested="auto"):
    """"bwrap" if bubblewrap is installed and runs here, else "rlimit" (with a warning, once)."""
    if requested != "auto":
        return requested
    with _MODE_LOCK:
        if "auto" in _MODE:
            return _MODE["auto"]
        ok = False
        if shutil.which("bwrap"):
            probe = subprocess.run(bwrap_argv(Limits(), [sys.executable, "-I", "-S", "-c", "pass"]),
                                   capture_output=True, timeout=30)
            ok = probe.returncode == 0
        _MODE["auto"] = "bwrap" if ok else "rlimit"
        if not ok:
            warnings.warn("bubblewrap (bwrap) is missing or cannot run here: code runs in a plain subprocess "
                          "with rlimits only (no PID/network/mount isolation; see README, Verifiers)", RuntimeWarning)
    return _MODE["auto"]


def _kill_session(sid):
    """SIGKILL every process still in session `sid` (a program's stray descendants)."""
    for _ in range(20):
        found = False
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:  # state ppid pgrp session
                        os.kill(int(pid), signal.SIGKILL)
                        found = True
            except (OSError, IndexError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


def run_tests(program, tests, limits=Limits()):
    """Run `program` on every test case in a sandboxed runner process.

    Returns {"results": ["pass" | "wrong" | "timeout" | "memory" | "output_limit" |
    "runtime_error", ...]} or {"error": "syntax_error" | "sandbox_error", "detail": ...}.
    Example: run_tests("print(int(input())*2)", {"inputs": ["3\\n"], "outputs": ["6\\n"]})
             -> {"results": ["pass"]}
    """
    mode = sandbox_mode(limits.mode)
    n = len(tests["inputs"])
    payload = {"program": program, "tests": tests, "limits": asdict(limits), "uid": random.randrange(*UID_RANGE)}
    workdir = None
    if mode == "bwrap":
        argv, cwd = bwrap_argv(limits), None
    else:
        workdir = cwd = tempfile.mkdtemp(prefix="prime_sandbox_")
        argv = [sys.executable, "-I", "-S", os.path.join(HERE, "sandbox.py")]
        if not (_world_traversable(sys.executable) and _world_traversable(os.path.join(HERE, "sandbox.py"))):
            payload["uid"] = None  # another uid could not even start Python
        if os.geteuid() == 0 and not payload["uid"] and not _MODE.get("warned_root"):
            _MODE["warned_root"] = True
            warnings.warn("sandbox fallback as root: Python is not readable by other users, so programs run as "
                          "root and RLIMIT_NPROC is not enforced (install bubblewrap)", RuntimeWarning)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    # The runner's own budget: every test's limit plus start-up; the runner stops at sample_timeout.
    wall = min(limits.sample_timeout, n * (limits.test_timeout + 0.5)) + 5.0
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True)
        out, err, status = communicate_capped(proc, json.dumps(payload).encode(), wall, 1 << 20)
        _kill_session(proc.pid)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if status == "timeout":
        return {"results": ["timeout"] * n}
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert isinstance(result, dict) and ("error" in result or len(result["results"]) == n), "malformed result"
        return result
    except (IndexError, ValueError, KeyError, TypeError, AssertionError):
        tail = err[-500:].decode("utf-8", "replace")
        return {"error": "sandbox_error", "detail": f"runner exit {proc.returncode} ({status}): {tail}"}


if __name__ == "__main__":
    runner_main()
