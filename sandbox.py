"""Run an untrusted Python program against test cases in a separate, limited process.

The code verifier's engine. Nothing here imports torch or the model code: the training process
calls `run_tests`, which starts this same file as a *runner* in a fresh process (inside bubblewrap,
or in a plain subprocess only when that weaker mode is named), sends it the program and the tests
on stdin, and reads one JSON result from its stdout. The runner starts the program once per test
case, each time in a fresh process with resource limits, and compares its output with the
expected one.
The program never sees the expected outputs, so it cannot print them.

Layers, outermost first:
  1. The training process: a cgroup of its own per sample where the trainer may create one
     (`cgroup_plan()`: cgroup v2 `memory.max` + `pids.max`, or the v1 memory and pids
     controllers), which every process of the sample joins before it starts, so that one memory
     budget (`memory_bound_mb`) covers all its processes, threads and the files it writes to
     tmpfs; a wall-clock limit for the whole sample; on expiry, or always at the end, SIGKILL to
     the cgroup, to the runner's process group and session, and (as root) to every process of the
     sample's uid. Without a cgroup the program gets far fewer processes (FALLBACK_PROCS), so the
     bound is their number times RLIMIT_AS, plus the size of the writable tmpfs mounts.
  2. bubblewrap (`mode="bwrap"`, the default): new PID, network, IPC, UTS and cgroup namespaces;
     a read-only root and /dev; a read-only view of /usr and of the Python installation only (no
     /home, /root, /work, /etc), wherever that installation lives (a venv under /tmp included: it
     is mounted after, hence on top of, the sandbox's own /tmp); a private size-limited tmpfs for
     /tmp and for the working directory (the only writable places); an empty environment; no
     capabilities except the three the runner needs to drop privileges and kill; death with its
     parent. If bwrap cannot run, the runner fails and every sample scores 0 ("sandbox_error"):
     nothing runs unconfined unless `mode="rlimit"` is named, which makes the runner a plain
     subprocess in a fresh temporary directory (removed afterwards), as PID 1 of a PID namespace
     of its own where `unshare` can make one (the program cannot kill it, and whatever is left
     dies with it). `bwrap_problem()` says whether bwrap works here, with the probe's own error.
  3. The runner: per test, a fresh process in its own process group, as an unused uid of its
     own (one per sample, drawn from the OS, so samples running side by side share no process
     count) when the runner is root (root ignores RLIMIT_NPROC), with RLIMIT_CPU, RLIMIT_AS,
     RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE and no core files; a wall-clock limit and a cap on
     stdout/stderr; afterwards SIGKILL to its process group and to any orphan (the runner is a
     child subreaper).

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
import resource
import secrets
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
FALLBACK_PROCS = 4  # RLIMIT_NPROC without a cgroup: the memory bound is this many times RLIMIT_AS
RUNNER_MB = 64  # the runner's share of a sample's cgroup (bwrap, the runner, Python's start-up)
OPEN_FILES = 64  # RLIMIT_NOFILE of the program


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program (all tests of one response)."""
    test_timeout: float = 5.0  # wall seconds per test case (PRIME's code reward: 5 s)
    sample_timeout: float = 30.0  # wall seconds for all tests of one response; later tests fail
    memory_mb: int = 1024  # RLIMIT_AS of each process, MiB; with a cgroup also the sample's total (+ RUNNER_MB)
    file_mb: int = 16  # RLIMIT_FSIZE: the largest file the program may write, MiB
    max_procs: int = 32  # processes and threads of the sample (pids.max); FALLBACK_PROCS without a cgroup
    output_bytes: int = 1 << 20  # cap on the program's stdout (and stderr) per test
    tmpfs_mb: int = 64  # size of the private /tmp and working directory under bwrap
    mode: str = "bwrap"  # "bwrap", or "rlimit" (a plain subprocess: only for code you would run unconfined)


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
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"],) * 2)  # max_procs, or FALLBACK_PROCS
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES,) * 2)
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
_PROBE = {}  # cache: bwrap_problem()'s answer for this process
_PROBE_LOCK = threading.RLock()  # bwrap_problem() scores its probe through run_tests
_WARNED = set()  # warnings already given once


def python_roots():
    """Folders of the Python that the sandbox runs, to be bound read-only: the interpreter's own
    (the folder above its bin/, symlinks resolved: a venv's `bin/python` usually points into its
    base installation) and the standard library's (sys.base_prefix; a venv made with --copies has
    its own interpreter but its base's library). A venv's site-packages are not needed: the runner
    and the programs start with `-I -S`. Folders inside another root or under /usr (bound whole)
    are left out."""
    exe = os.path.realpath(sys.executable)
    roots = {os.path.dirname(os.path.dirname(exe)), os.path.realpath(sys.base_prefix),
             os.path.realpath(sys.base_exec_prefix)}
    roots = {r for r in roots if r not in ("/", "/usr") and not r.startswith("/usr/")}
    return sorted(r for r in roots if not any(r.startswith(other + "/") for other in roots))


def bwrap_argv(limits, command=None):
    """The bubblewrap command line that starts the runner (or `command`): what it can see and do.

    Writable are only /tmp and the working directory /sandbox, tmpfs mounts of `tmpfs_mb` each;
    the root (with /runner) and /dev (with /dev/shm) are tmpfs mounts without a size limit, hence
    read-only. bwrap makes its mounts in order, so the Python installation is bound last: when it lives
    under /tmp (`python -m venv /tmp/venv`) or under /sandbox, it is mounted on top of the
    private tmpfs instead of being hidden by it. It keeps its own path: an interpreter names its
    shared libpython (rpath) and a venv its base installation (pyvenv.cfg) by absolute path, so
    a copy bound elsewhere would not start."""
    size = str(limits.tmpfs_mb << 20)
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr"]
    if os.geteuid() == 0:  # root: no user namespace (the runner must be able to change uid)
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    else:  # an ordinary user needs a user namespace for the others
        argv += ["--unshare-user"]
    for d in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
             "--size", size, "--tmpfs", "/sandbox", "--ro-bind", os.path.join(HERE, "sandbox.py"), "/runner/sandbox.py"]
    for root in python_roots():
        parents, p = [], os.path.dirname(root)
        while p != "/":
            parents.insert(0, p)
            p = os.path.dirname(p)
        for p in parents:  # bwrap would copy a 0700 /root; the program's uid must pass through
            argv += ["--perms", "0755", "--dir", p]  # (a folder that is already there, as /tmp, keeps its mode)
        argv += ["--ro-bind", root, root]
    # bwrap's root (and /runner on it) is a tmpfs without a size limit: read-only once all is mounted
    argv += ["--remount-ro", "/", "--chdir", "/sandbox", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--"]
    return argv + (command or [os.path.realpath(sys.executable), "-I", "-S", "/runner/sandbox.py"])


def _world_traversable(path):
    """Can any user reach `path` (every folder on the way has o+x)?"""
    path = os.path.realpath(path)
    while path != "/":
        path = os.path.dirname(path)
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:  # we may not look: then neither may another user
            return False
    return True


def bwrap_problem():
    """None if bubblewrap runs the runner here; else why not, in the probe's own words (such as
    "bwrap: setting up uid map: Permission denied"). The probe scores a one-line program
    through `run_tests` exactly as a sample is scored; the answer is cached for the process."""
    with _PROBE_LOCK:
        if "bwrap" not in _PROBE:
            got = run_tests("print(1)", {"inputs": [""], "outputs": ["1"]}, Limits(mode="bwrap"))
            if got == {"results": ["pass"]}:
                _PROBE["bwrap"] = None
            elif "detail" in got:  # bwrap or the runner failed: their own error
                _PROBE["bwrap"] = got["detail"]
            else:  # the runner ran, the program did not
                _PROBE["bwrap"] = f"the probe program `print(1)` scored {got} inside bubblewrap" + (
                    "; as root, programs run as an unused uid, which must be able to read Python "
                    f"({os.path.realpath(sys.executable)}; chmod -R o+rX its folder)" if os.geteuid() == 0 else "")
        return _PROBE["bwrap"]


def bwrap_error(problem):
    """The message that stops a run with code rows when bubblewrap cannot run: its error and the fix."""
    return (f"code rows are verified in a bubblewrap sandbox, and bwrap cannot run here: {problem.strip()}\n"
            "fix: install bubblewrap (apt-get install bubblewrap, or dnf install bubblewrap) where it may create "
            "namespaces (a container may need unprivileged user namespaces or CAP_SYS_ADMIN); or, "
            "only where these programs may run unconfined (trusted code, a throwaway container), ask for the "
            "weaker sandbox by name: --sandbox rlimit (a plain subprocess with resource limits; docs/VERIFIERS.md)")


# ---------------------------------------------------------------------------------------------
# One cgroup per sample: a memory and process budget for all its processes, and a way to kill them.
# ---------------------------------------------------------------------------------------------
_CGROUP = {}  # cache: cgroup_plan()'s answer for this process
# A sample's processes join its cgroup before anything of the sample runs: `sh` moves itself into
# each folder ("0" is the writer itself) and then becomes the runner (exec keeps the pid).
JOIN = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo 0 > "$1/cgroup.procs" || exit 125; shift; n=$((n-1)); done; exec "$@"'


def _cgroup_parents():
    """Where this process may make child cgroups: [(kind, folder)], kind "v2" (memory and pids
    enabled in its subtree_control), "v2-kill" (no controllers: only cgroup.kill), "memory" or
    "pids" (cgroup v1). A cgroup v2 folder with processes cannot enable controllers for its
    children ("no internal processes"), so the sample's cgroup is made as a child of ours when its
    controllers are already on, else as a sibling (a child of our parent), else without limits."""
    mounts = {}  # "v2" / controller name -> (mount root, mount point)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _, options) = left.split(), right.split()[:3]
            if fstype == "cgroup2":
                mounts.setdefault("v2", (fields[3], fields[4]))
            elif fstype == "cgroup":
                for name in set(options.split(",")) & {"memory", "pids"}:
                    mounts.setdefault(name, (fields[3], fields[4]))
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            hier, names, path = line.rstrip("\n").split(":", 2)
            for key in (["v2"] if hier == "0" else set(names.split(",")) & {"memory", "pids"}):
                if key not in mounts:
                    continue
                root, point = mounts[key]
                if not (path + "/").startswith(root.rstrip("/") + "/"):
                    continue  # our cgroup is outside what this mount shows
                here = os.path.normpath(point + "/" + path[len(root.rstrip("/")):])
                if key != "v2":
                    found.append((key, here))
                    continue
                for parent in ([here, os.path.dirname(here)] if here != point else [here]):
                    try:
                        with open(os.path.join(parent, "cgroup.subtree_control")) as f2:
                            enabled = set(f2.read().split())
                    except OSError:
                        continue
                    if {"memory", "pids"} <= enabled:
                        found.append(("v2", parent))
                        break
                else:
                    found.append(("v2-kill", here))
    return found


class SampleCgroup:
    """A sample's own cgroup, one folder per hierarchy we may write (none where we may not).

    `memory.max` (v1: memory.limit_in_bytes) of memory_mb + RUNNER_MB covers every process and
    thread of the sample and the tmpfs pages it writes (they are charged to the writer's cgroup);
    `pids.max` caps its processes and threads at max_procs. `bounded` says whether both hold."""

    def __init__(self, limits, parents):
        self.dirs, limited = [], set()
        name = f"prime-sample-{os.getpid()}-{secrets.token_hex(6)}"
        memory, procs = str((limits.memory_mb + RUNNER_MB) << 20), str(limits.max_procs)
        files = {"v2": [("memory.max", memory, "memory"), ("memory.swap.max", "0", "swap"), ("pids.max", procs, "pids")],
                 "memory": [("memory.limit_in_bytes", memory, "memory"), ("memory.memsw.limit_in_bytes", memory, "swap")],
                 "pids": [("pids.max", procs, "pids")], "v2-kill": []}
        try:
            for kind, parent in parents:
                path = os.path.join(parent, name)
                os.mkdir(path)
                self.dirs.append(path)
                for fname, value, what in files[kind]:
                    if os.path.exists(os.path.join(path, fname)):  # no swap accounting: no swap file
                        with open(os.path.join(path, fname), "w") as f:
                            f.write(value)
                        limited.add(what)
        except OSError:
            self.close()
            raise
        self.bounded = {"memory", "pids"} <= limited

    def wrap(self, argv):
        """`argv` started inside this cgroup."""
        return ["/bin/sh", "-c", JOIN, "sh", str(len(self.dirs)), *self.dirs, *argv] if self.dirs else argv

    def close(self):
        """SIGKILL every process in the cgroup, then remove it (it can go once it is empty)."""
        for _ in range(200):
            alive = False
            for path in self.dirs:
                try:
                    if os.path.exists(os.path.join(path, "cgroup.kill")):
                        with open(os.path.join(path, "cgroup.kill"), "w") as f:
                            f.write("1")
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        pids = [int(p) for p in f.read().split()]
                except OSError:
                    continue
                for pid in pids:  # cgroup v1 has no cgroup.kill
                    alive = True
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if not alive:
                break
            time.sleep(0.01)
        for path in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy: a killed process is still exiting
                    time.sleep(0.01)


def cgroup_plan():
    """The cgroup folders a sample's cgroup is made in here ([] if none), checked once by making
    one, moving a process into it and killing it; cached for the process."""
    with _PROBE_LOCK:
        if "plan" not in _CGROUP:
            try:
                parents = _cgroup_parents()
            except (OSError, ValueError):
                parents = []
            works = []
            for kind, parent in parents:
                try:
                    cg = SampleCgroup(Limits(), [(kind, parent)])
                except OSError:
                    continue
                try:
                    if cg.dirs and subprocess.run(cg.wrap(["/bin/sh", "-c", "exit 0"]), timeout=10).returncode == 0:
                        works.append((kind, parent))
                except (OSError, subprocess.TimeoutExpired):
                    pass
                finally:
                    cg.close()
            _CGROUP["plan"] = works
        return _CGROUP["plan"]


def memory_path():
    """How a sample's memory is bounded here: "cgroup v2", "cgroup v1" or "rlimits" (no cgroup)."""
    kinds = {kind for kind, _ in cgroup_plan()}
    if "v2" in kinds:
        return "cgroup v2"
    return "cgroup v1" if {"memory", "pids"} <= kinds else "rlimits"


def memory_bound_mb(limits):
    """The most memory (MiB) that one sample can hold, all its processes, threads and files together.

    With a cgroup: memory_mb + RUNNER_MB. Without one: FALLBACK_PROCS processes of memory_mb each,
    the runner, and (under bwrap) the two writable tmpfs mounts (in the rlimit mode its files go
    to the host's temporary folder, on disk or in memory: there only each file's size is
    limited). Not counted without a cgroup: SysV shared memory segments and memfd files, which
    live outside RLIMIT_AS (no seccomp filter refuses them yet)."""
    if memory_path() != "rlimits":
        return limits.memory_mb + RUNNER_MB
    return FALLBACK_PROCS * limits.memory_mb + RUNNER_MB + (2 * limits.tmpfs_mb if limits.mode == "bwrap" else 0)


def sample_uid():
    """An unused uid for one sample's program, drawn from the OS (not from the training-seeded
    `random`: two trainers with the same seed would share one RLIMIT_NPROC count)."""
    return UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])


def unshare_argv():
    """`unshare` making the runner PID 1 of a PID namespace of its own (rlimit mode): the program
    cannot kill it (PID 1 gets only the signals it handles), orphans come to it, and when it exits
    the kernel kills everything left in the namespace. None if `unshare` cannot do it here."""
    with _PROBE_LOCK:
        if "unshare" not in _PROBE:
            argv = [shutil.which("unshare") or "unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
            if os.geteuid() != 0:  # an ordinary user needs a user namespace for that (same uid inside)
                argv += ["--map-current-user"]
            try:
                ok = subprocess.run(argv + ["/bin/sh", "-c", "exit 0"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            _PROBE["unshare"] = argv if ok else None
        return _PROBE["unshare"]


def _kill_matching(field, value):
    """SIGKILL every process whose /proc field `field` ("session" in stat, or "uid": the real uid
    in status) is `value`: a sample's stray descendants."""
    for _ in range(20):
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if field == "session":
                    with open(f"/proc/{pid}/stat") as f:
                        hit = int(f.read().rsplit(")", 1)[1].split()[3]) == value  # state ppid pgrp session
                else:
                    with open(f"/proc/{pid}/status") as f:
                        hit = any(line.split()[1] == str(value) for line in f if line.startswith("Uid:"))
                if hit:
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
    mode = limits.mode
    assert mode in ("bwrap", "rlimit"), f"sandbox mode must be 'bwrap' or 'rlimit', got {mode!r}"
    n = len(tests["inputs"])
    payload = {"program": program, "tests": tests, "limits": asdict(limits), "uid": sample_uid()}
    workdir = None
    if mode == "bwrap":
        if not shutil.which("bwrap"):
            return {"error": "sandbox_error", "detail": "bwrap is not installed (no `bwrap` on PATH)"}
        argv, cwd = bwrap_argv(limits), None
    else:
        argv = [sys.executable, "-I", "-S", os.path.join(HERE, "sandbox.py")]
        if not (_world_traversable(sys.executable) and _world_traversable(os.path.join(HERE, "sandbox.py"))):
            payload["uid"] = None  # another uid could not even start Python
        if os.geteuid() == 0 and not payload["uid"]:
            if memory_path() == "rlimits":
                return {"error": "sandbox_error", "detail": "sandbox mode rlimit as root: Python is not readable by "
                        "other users, so programs would run as root, where RLIMIT_NPROC does nothing, and no cgroup "
                        f"bounds their memory (chmod -R o+rX the folder of {os.path.realpath(sys.executable)}, or "
                        "install bubblewrap)"}
            if "root" not in _WARNED:
                _WARNED.add("root")
                warnings.warn("sandbox mode rlimit as root: Python is not readable by other users, so programs run as "
                              "root, within the sample's cgroup (install bubblewrap)", RuntimeWarning)
        if unshare_argv():
            argv = unshare_argv() + argv
        elif not cgroup_plan() and not (os.geteuid() == 0 and payload["uid"]):
            return {"error": "sandbox_error", "detail": "sandbox mode rlimit cannot make sure that no process "
                    "outlives its sample here: no cgroup, no PID namespace (unshare), and not root"}
        workdir = cwd = tempfile.mkdtemp(prefix="prime_sandbox_")
    try:
        cgroup = SampleCgroup(limits, cgroup_plan())
    except OSError as e:
        return {"error": "sandbox_error", "detail": f"cannot make the sample's cgroup: {e}"}
    payload["limits"]["nproc"] = limits.max_procs if cgroup.bounded else min(limits.max_procs, FALLBACK_PROCS)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    # The runner's own budget: every test's limit plus start-up; the runner stops at sample_timeout.
    wall = min(limits.sample_timeout, n * (limits.test_timeout + 0.5)) + 5.0
    try:
        proc = subprocess.Popen(cgroup.wrap(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
        try:
            out, err, status = communicate_capped(proc, json.dumps(payload).encode(), wall, 1 << 20)
        finally:
            _kill_matching("session", proc.pid)
    finally:  # whatever happened: no process of the sample outlives it
        cgroup.close()
        if os.geteuid() == 0 and payload["uid"]:
            _kill_matching("uid", payload["uid"])  # nothing else runs as this uid
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
