"""The code sandbox: honest programs get their score, hostile ones get 0 within their time limit,
leave no process and no file behind, and cannot touch the test process.

Each hostile program runs under bubblewrap (`mode="bwrap"`, skipped where bwrap cannot run) and,
where that is safe, in the weaker plain-subprocess mode (`mode="rlimit"`). Programs that could
harm the machine outside a PID namespace (a fork bomb, `kill(-1)`) run only under bwrap, and the
fork bomb only after a bounded check that RLIMIT_NPROC is really enforced there. The bwrap tests
run again with Python in a virtual environment under /tmp, which the sandbox's private /tmp must
not hide; and a bubblewrap that cannot run must stop the programs, not let them run unconfined.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import sandbox
from conftest import need_bwrap
import verifiers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["bwrap", "rlimit"]  # a bwrap test skips where bubblewrap cannot run, and fails under CI (conftest)
BWRAP_ONLY = pytest.mark.usefixtures("bwrap_required")  # unsafe or not isolated without it
STDIN_TESTS = {"inputs": ["1 2\n", "3 4\n", "10 -10\n"], "outputs": ["3\n", "7\n", "0\n"]}
CALL_TESTS = {"inputs": [[1, 2], [3, 4]], "outputs": [3, 7], "fn_name": "add"}
ONE_TEST = {"inputs": ["1 2\n"], "outputs": ["3\n"]}  # hostile programs: one test keeps the suite fast
TEST_TIMEOUT = 1.0  # hostile programs: short limits keep the suite fast
HONEST_TIMEOUT = 5.0  # honest programs: the default, so a loaded machine cannot turn them into timeouts


def limits(mode, test_timeout=TEST_TIMEOUT):
    return sandbox.Limits(test_timeout=test_timeout, sample_timeout=6 * test_timeout, memory_mb=256, mode=mode)


def stray_processes():
    """Processes of ours still alive: runners (bwrap or fallback) and programs (solution.py)."""
    marks = (b"solution.py", b"/runner/sandbox.py", os.path.join(sandbox.HERE, "sandbox.py").encode())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(pid) != os.getpid() and any(m in cmd for m in marks):
            found.append((int(pid), cmd[:80]))
    return found


def temp_dirs():
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("prime_sandbox_")}


def run_checked(program, tests, mode, test_timeout=TEST_TIMEOUT):
    """Score `program` and check the sandbox's promises: done within its time limit, no process
    and no temporary folder left behind, the test process untouched."""
    if mode == "bwrap":
        need_bwrap()
    before, ppid = temp_dirs(), os.getppid()
    t = time.monotonic()
    score = verifiers.code_reward("```python\n" + program + "\n```", tests, limits(mode, test_timeout))
    took = time.monotonic() - t
    # the trainer's hard limit on the runner (sandbox.run_tests), plus a little for killing and reaping
    budget = min(6 * test_timeout, len(tests["inputs"]) * (test_timeout + 0.5)) + 5 + 2
    assert took < budget, f"took {took:.1f}s, limit {budget:.1f}s"
    assert not stray_processes(), f"processes left behind: {stray_processes()}"
    assert temp_dirs() <= before, f"temporary folders left behind: {temp_dirs() - before}"
    assert os.getppid() == ppid, "the test process was re-parented"
    return score


# ---------------------------------------------------------------------------------------------
# Honest programs.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("program, tests, expect", [
    ("a, b = map(int, input().split())\nprint(a + b)", STDIN_TESTS, (1.0, "correct")),
    ("a, b = map(int, input().split())\nprint(a * b)", STDIN_TESTS, (0.0, "wrong")),
    ("a, b = map(int, input().split())\nprint(a + b if a < 5 else 1)", STDIN_TESTS, (2 / 3, "partial")),
    ("def add(a, b):\n    return a + b", CALL_TESTS, (1.0, "correct")),
    ("class Solution:\n    def add(self, a, b):\n        return a + b", CALL_TESTS, (1.0, "correct")),
    ("def add(a, b):\n    return 3", CALL_TESTS, (0.5, "partial")),
    ("def add(a, b) return a + b", CALL_TESTS, (0.0, "syntax_error")),
    ("a, b = map(int, input().split())\nprint(a + b if b != 4 else a / (b - 4))", STDIN_TESTS, (2 / 3, "partial")),
    ("raise RuntimeError('boom')", STDIN_TESTS, (0.0, "runtime_error")),
    ("def add(a, b):\n    return [][a]", CALL_TESTS, (0.0, "runtime_error")),
    ("open('t.txt', 'w').write(input())\na, b = map(int, open('t.txt').read().split())\nprint(a + b)", STDIN_TESTS,
     (1.0, "correct")),  # the working directory is writable
])
def test_honest_program_gets_its_score(mode, program, tests, expect):
    score, reason = run_checked(program, tests, mode, HONEST_TIMEOUT)
    assert (round(score, 6), reason) == (round(expect[0], 6), expect[1]), (score, reason)


def test_output_comparison_ignores_whitespace_and_allows_numeric_tolerance():
    assert sandbox.stdout_matches("1 2\n3.0000001\n\n", "1 2\n3"), "tolerance and blank lines"
    assert sandbox.stdout_matches("  a  b \r\nc", "a b\nc\n"), "spaces and CRLF"
    assert sandbox.stdout_matches("1\n2\n", ["1", "2"]), "expected output given as lines"
    assert not sandbox.stdout_matches("1 2", "1 3"), "different numbers"
    assert not sandbox.stdout_matches("", "0"), "no output"
    assert sandbox.value_matches((1, 2), [1, 2]) and sandbox.value_matches([1, 2], [[1, 2]]), "tuples, APPS wrapping"
    assert sandbox.value_matches(0.1 + 0.2, 0.3) and not sandbox.value_matches(True, 1), "floats, bool is not int"


@pytest.mark.parametrize("row", [json.loads(l) for l in open(os.path.join(ROOT, "data", "code_problems.jsonl"))],
                         ids=lambda r: f"problem{r['extra_info']['index']}")
def test_every_shipped_problem_accepts_its_reference_and_rejects_a_wrong_program(row, code_mode):
    ref = "```python\n" + row["extra_info"]["reference"] + "\n```"
    lim = sandbox.Limits(mode=code_mode)
    assert verifiers.outcome_reward(row, ref, lim) == (1.0, "correct"), row["prompt"][0]["content"]
    tests = json.loads(row["reward_model"]["ground_truth"])
    wrong = "def {0}(*a):\n    return None".format(tests["fn_name"]) if "fn_name" in tests else "print('nope')"
    assert verifiers.outcome_reward(row, wrong, lim)[0] == 0.0, row["prompt"][0]["content"]


def test_shipped_problems_are_about_twenty_of_both_kinds():
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data", "code_problems.jsonl"))]
    kinds = [("fn_name" in json.loads(r["reward_model"]["ground_truth"])) for r in rows]
    assert len(rows) >= 20 and 0 < sum(kinds) < len(rows), f"{len(rows)} rows, {sum(kinds)} call-based"


# ---------------------------------------------------------------------------------------------
# Hostile programs, in both modes where that is safe.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("program, tests, reasons", [
    ("while True:\n    pass", ONE_TEST, {"timeout"}),
    ("import time\ntime.sleep(100)", {**CALL_TESTS, "inputs": [[1, 2]], "outputs": [3]}, {"timeout"}),
    ("x = bytearray(1 << 34)", ONE_TEST, {"memory"}),
    # touching 256 MiB page by page can outlast a 1 s limit on a loaded machine: either is a fail
    ("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", ONE_TEST, {"memory", "timeout"}),
    ("while True:\n    print('x' * 10000)", ONE_TEST, {"output_limit"}),
    ("import sys\nsys.stdout.write('y' * 10 ** 8)", ONE_TEST, {"output_limit", "memory"}),
    ("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", CALL_TESTS, {"runtime_error"}),
    ("import os\nos._exit(0)\ndef add(a, b):\n    return a + b", CALL_TESTS, {"runtime_error"}),
    ("import sys\nsys.exit(0)", ONE_TEST, {"wrong"}),
    ("import os\nprint(os.environ.get('PRIME_TEST_SECRET', 'none'))", {"inputs": [""], "outputs": ["s3cret"]}, {"wrong"}),
    ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\nprint(3)",  # a detached orphan
     {"inputs": ["1 2\n"], "outputs": ["4\n"]}, {"wrong", "timeout"}),  # the orphan holds stdout open
    ("with open('big', 'wb') as f:\n    f.write(b'0' * (64 << 20))\nprint(3)", {"inputs": ["1 2\n"], "outputs": ["3\n"]},
     {"runtime_error"}),
])
def test_hostile_program_scores_zero_and_leaves_nothing(mode, program, tests, reasons, monkeypatch):
    monkeypatch.setenv("PRIME_TEST_SECRET", "s3cret")
    score, reason = run_checked(program, tests, mode)
    assert score == 0.0 and reason in reasons, (score, reason)


@pytest.mark.parametrize("mode", MODES)
def test_program_that_kills_its_runner_leaves_nothing(mode):
    # bwrap, as root: the program's uid may not signal the runner (runtime_error); an ordinary
    # user's runner dies (sandbox_error). rlimit: the runner is PID 1 of its namespace, where the
    # signal does not reach it, so the program goes on and is scored as usual.
    program = "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(0.2)\nprint(3)"
    score, reason = run_checked(program, {"inputs": ["1 2\n"], "outputs": ["3\n"]}, mode)
    assert reason in {"runtime_error", "sandbox_error", "correct"}, (score, reason)


@BWRAP_ONLY
@pytest.mark.parametrize("program", [
    # every environment the sandbox can see, including other processes' (none visible here)
    "import os, glob\nfound = os.environ.get('PRIME_TEST_SECRET', '')\n"
    "for p in glob.glob('/proc/*/environ'):\n    try:\n        found += open(p, 'rb').read().decode(errors='ignore')\n"
    "    except OSError:\n        pass\nprint('s3cret' if 's3cret' in found else 'none')",
])
def test_secrets_of_the_training_process_are_out_of_reach(program, monkeypatch):
    monkeypatch.setenv("PRIME_TEST_SECRET", "s3cret")
    result = run_checked(program, {"inputs": [""], "outputs": ["s3cret"]}, "bwrap", HONEST_TIMEOUT)
    assert result == (0.0, "wrong"), f"the program found the secret: {result}"


@BWRAP_ONLY
def test_writing_outside_the_working_directory_changes_nothing(tmp_path):
    targets = [str(tmp_path / "outside.txt"), os.path.join(ROOT, "pwned.txt"), "/tmp/prime_pwned.txt"]
    program = ("ok = 0\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n        ok += 1\n"
               "    except OSError:\n        pass\nprint(ok)" % targets)
    # /tmp inside the sandbox is private: writing there works but never reaches the host's /tmp
    score, reason = run_checked(program, {"inputs": [""], "outputs": ["3"]}, "bwrap")
    assert score == 0.0, (score, reason)
    assert not any(os.path.exists(p) for p in targets), "a file appeared outside the sandbox"


@BWRAP_ONLY
def test_program_cannot_reach_the_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\nprint('connected')")
    try:
        score, reason = run_checked(program, {"inputs": [""], "outputs": ["connected"]}, "bwrap", HONEST_TIMEOUT)
    finally:
        server.close()
    assert (score, reason) == (0.0, "runtime_error"), (score, reason)
    program = "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=0.5)\nprint('connected')"
    result = run_checked(program, {"inputs": [""], "outputs": ["connected"]}, "bwrap", HONEST_TIMEOUT)
    assert result == (0.0, "runtime_error"), f"reached 1.1.1.1: {result}"


@BWRAP_ONLY
def test_kill_everything_reaches_only_the_sandbox():
    # kill(-1) signals every process the caller may signal: as its own uid in its own PID namespace
    # that is nothing (the runner is root), so the program goes on and the runner reports it.
    assert sandbox.bwrap_problem() is None, "kill(-1) must never run outside a PID namespace"
    program = "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint(3)"
    score, reason = run_checked(program, {"inputs": ["1 2\n"], "outputs": ["3\n"]}, "bwrap", HONEST_TIMEOUT)
    assert (score, reason) == (1.0, "correct"), (score, reason)


@BWRAP_ONLY
def test_fork_bomb_is_contained():
    # First a bounded probe: try to start 200 sleeping processes. If all 200 start, RLIMIT_NPROC
    # is not enforced in the sandbox and a real fork bomb could exhaust the machine's PIDs: skip.
    probe = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n"
             "        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    n += 1\nprint(n)")
    score, _ = run_checked(probe, {"inputs": [""], "outputs": ["200"]}, "bwrap")
    if score == 1.0:
        pytest.skip("RLIMIT_NPROC is not enforced in the sandbox here: a fork bomb is too dangerous to test")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    score, reason = run_checked(bomb, {"inputs": [""], "outputs": ["1"]}, "bwrap")
    assert (score, reason) == (0.0, "timeout"), (score, reason)
    # Side by side with honest samples: each sample has its own process count, so they still run.
    sample = {"ability": "code", "reward_model": {"ground_truth": json.dumps(ONE_TEST)}}
    honest = "a, b = map(int, input().split())\nprint(a + b)"
    out = verifiers.outcome_rewards([sample] * 4, [bomb, honest, honest, honest], limits("bwrap", 3.0), workers=4)
    assert out == [(0.0, "timeout")] + [(1.0, "correct")] * 3, f"the fork bomb disturbed other samples: {out}"
    assert not stray_processes(), stray_processes()


def test_many_samples_in_parallel_each_get_their_own_score(code_mode):
    programs = ["a, b = map(int, input().split())\nprint(a + b)", "while True:\n    pass", "print(0)"] * 4
    tests = {"inputs": ["1 2\n", "0 0\n"], "outputs": ["3\n", "0\n"]}
    samples = [{"ability": "code", "reward_model": {"ground_truth": json.dumps(tests)}}] * len(programs)
    t = time.monotonic()
    out = verifiers.outcome_rewards(samples, programs, limits(code_mode, 2.0), workers=4)
    assert [r for _, r in out] == ["correct", "timeout", "partial"] * 4, out
    assert time.monotonic() - t < 30, "the pool ran the hanging programs one after another"
    assert not stray_processes(), stray_processes()


# ---------------------------------------------------------------------------------------------
# One memory budget per sample, read-only memory-backed mounts, no orphan: as root and as nobody.
# ---------------------------------------------------------------------------------------------
# Six children each touch 200 MB (1.2 GB in all, memory_mb=256); the parent prints the answer if all live.
FORK_HOG = """import os, time
n, kids = 0, []
for _ in range(6):
    r, w = os.pipe()
    kids.append(os.fork())
    if kids[-1] == 0:
        os.close(1), os.close(2)  # the parent's output ends when the parent ends
        x = bytearray(200 << 20)
        x[::4096] = b"x" * len(range(0, len(x), 4096))  # touch every page
        os.write(w, b"k")
        time.sleep(30)
        os._exit(0)
    os.close(w)
    n += len(os.read(r, 1))
alive = sum(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in kids)  # all six at once, or it does not count
print(3 if n == alive == 6 else n)"""
# 130 MB into each memory-backed folder a program might see (8 MB files: RLIMIT_FSIZE is 16 MiB).
FILL_FOLDERS = """import os
total = 0
for d in ["/", "/dev", "/dev/shm", "/runner", "/tmp", "."]:
    for i in range(16):
        try:
            with open(os.path.join(d, f"fill{i}"), "wb") as f:
                f.write(b"x" * (8 << 20))
            total += 8
        except OSError:
            break
print(3 if total >= 600 else total)"""
# The child leaves the runner's session, the parent kills the runner: the child must die anyway.
ORPHAN = """import os, signal, time
if os.fork() == 0:
    os.setsid()
    time.sleep(100)
    os._exit(0)
os.kill(os.getppid(), signal.SIGKILL)
time.sleep(0.5)
print(3)"""
NOBODY = 65534  # the unprivileged user the hostile programs run as, besides root
SLACK_MB = 400  # MemAvailable is the whole machine's: other processes move it too (seen: up to ~200 MiB here)


def unprivileged_python():
    """A Python 3.11+ that uid 65534 may start (the test's own, else the system's), or None."""
    for python in (sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3"):
        if python and sandbox._world_traversable(python) and subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python,
                                      "-I", "-S", "-c", "import sys; assert sys.version_info >= (3, 11)"],
                                     capture_output=True).returncode == 0:
            return python
    return None


def least_available_mb(stop, out):
    """Sample MemAvailable until `stop` is set; the smallest value (MiB) goes into out[0]."""
    while True:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) >> 10
        out[0] = min(out[0], avail)
        if stop.wait(0.005):
            return


def score_as(user, program, mode, cgroup=True):
    """Run `program` on ONE_TEST as `user` ("root", or "nobody": a subprocess as uid 65534 with
    sandbox.py copied to a folder it can read). Returns (result, how memory is bounded, the bound
    in MiB, the most memory the machine lost meanwhile in MiB)."""
    lim = limits(mode, HONEST_TIMEOUT)  # time enough to pass, were the limits not there
    if user == "root":
        if not cgroup:  # the path of a machine where the trainer may make no cgroup
            sandbox._CGROUP["plan"] = []
        call = lambda: (sandbox.run_tests(program, ONE_TEST, lim), sandbox.memory_path(), sandbox.memory_bound_mb(lim))
    else:
        python = unprivileged_python()
        if python is None:
            (pytest.fail if os.environ.get("CI") else pytest.skip)("no Python that uid 65534 may run")
        code = ("import json, sys\nsys.path.insert(0, '.')\nimport sandbox\n"
                f"lim = sandbox.Limits(**{sandbox.asdict(lim)!r})\n"
                f"print(json.dumps([sandbox.run_tests({program!r}, {ONE_TEST!r}, lim), sandbox.memory_path(), "
                "sandbox.memory_bound_mb(lim)]))")
        def call():
            with tempfile.TemporaryDirectory(prefix="prime_nobody_") as tmp:
                os.chmod(tmp, 0o755)
                shutil.copy(os.path.join(sandbox.HERE, "sandbox.py"), tmp)
                out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                      python, "-I", "-S", "-c", code], cwd=tmp, capture_output=True, text=True,
                                     timeout=60, env={"PATH": os.environ["PATH"]})
                assert out.returncode == 0, out.stderr
                return tuple(json.loads(out.stdout.strip().splitlines()[-1]))
    with open("/proc/meminfo") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) >> 10
    stop, least = threading.Event(), [before]
    watcher = threading.Thread(target=least_available_mb, args=(stop, least))
    watcher.start()
    try:
        result, path, bound = call()
    finally:
        stop.set()
        watcher.join()
    return result, path, bound, before - least[0]


def no_program_left(program):
    """No process is left that runs a solution (its command line names solution.py)."""
    time.sleep(0.2)  # SIGKILLed processes may take a moment to leave /proc; a leftover sleeps 100 s
    return [p for p in stray_processes() if b"solution.py" in p[1]]


USERS = [("root", True), ("root", False), ("nobody", True)]  # (user, may make a cgroup)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("user, cgroup", USERS, ids=["root", "root-no-cgroup", "nobody"])
def test_forked_children_share_one_memory_budget(mode, user, cgroup, monkeypatch):
    if mode == "bwrap":
        need_bwrap()
    monkeypatch.setattr(sandbox, "_CGROUP", {})
    result, path, bound, used = score_as(user, FORK_HOG, mode, cgroup)
    if user == "root" and mode == "rlimit" and not cgroup and not sandbox._world_traversable(sys.executable):
        assert "would run as root" in result.get("detail", ""), result  # refused: nothing would bound it
        return
    assert "results" in result, f"{user}: the sandbox did not run ({result})"
    assert verifiers.code_score(result["results"])[0] == 0.0, f"{user}: six children of 200 MB scored {result} ({path})"
    assert used <= bound + SLACK_MB, f"{user}, {path}: the machine lost {used} MiB, the bound is {bound} MiB"
    assert not no_program_left(FORK_HOG), stray_processes()


@BWRAP_ONLY
@pytest.mark.parametrize("user, cgroup", USERS, ids=["root", "root-no-cgroup", "nobody"])
def test_memory_backed_folders_are_read_only_or_size_limited(user, cgroup, monkeypatch):
    monkeypatch.setattr(sandbox, "_CGROUP", {})
    result, path, bound, used = score_as(user, FILL_FOLDERS, "bwrap", cgroup)
    assert result in ({"results": ["wrong"]}, {"results": ["runtime_error"]}), f"{user}: {result} ({path})"
    assert used <= bound + SLACK_MB, f"{user}, {path}: the machine lost {used} MiB, the bound is {bound} MiB"
    # what it managed to write: /tmp and the working directory only, tmpfs_mb (64) each at most
    report = FILL_FOLDERS.replace("print(3 if total >= 600 else total)", "print(3 if total <= 2 * 64 else total)")
    got = score_as(user, report, "bwrap", cgroup)[0]
    assert got == {"results": ["pass"]}, f"{user}: more than 2 x 64 MB written ({got}, {path})"


@pytest.mark.parametrize("user, cgroup", USERS, ids=["root", "root-no-cgroup", "nobody"])
def test_detached_child_of_a_program_that_kills_its_runner_dies_with_the_sample(user, cgroup, monkeypatch):
    monkeypatch.setattr(sandbox, "_CGROUP", {})
    result, path, _, _ = score_as(user, ORPHAN, "rlimit", cgroup)
    assert not no_program_left(ORPHAN), f"{user} ({path}): the detached child outlived its sample"


def test_sample_uid_comes_from_the_os_not_from_the_seeded_random():
    import random
    random.seed(1234)
    first = [sandbox.sample_uid() for _ in range(4)]
    random.seed(1234)
    second = [sandbox.sample_uid() for _ in range(4)]
    assert first != second, "two trainers with the same seed drew the same uids"
    random.seed(1234)
    sandbox.sample_uid()
    assert random.random() == random.Random(1234).random(), "the draw consumed the global random's state"
    assert all(sandbox.UID_RANGE[0] <= u < sandbox.UID_RANGE[1] for u in first + second)


# ---------------------------------------------------------------------------------------------
# Where Python lives, and a bubblewrap that cannot run.
# ---------------------------------------------------------------------------------------------
# Can bubblewrap run here at all, whatever the Python? (the sandbox, running /usr/bin/true)
BWRAP_ITSELF_RUNS = bool(shutil.which("bwrap")) and subprocess.run(
    sandbox.bwrap_argv(limits("bwrap"), ["/usr/bin/true"]), capture_output=True).returncode == 0
NO_BWRAP_AT_ALL = pytest.mark.skipif(not BWRAP_ITSELF_RUNS and not os.environ.get("CI"),  # CI: fail, not skip
                                     reason="bubblewrap itself cannot run here")
# The bwrap tests of this file, hostile programs all, to run again through another Python.
BWRAP_TESTS = "((hostile and bwrap) or outside or network or secrets or kill_everything or fork_bomb) and not venv"


def see_our_packages(python):
    """Make the venv of `python` import this interpreter's packages (pytest, math_verify, ...).

    `--system-site-packages` is not that: made from a venv's Python it adds the *base*
    interpreter's site-packages, not the outer venv's, and the inner pytest then dies on a missing
    module. A .pth file in the inner venv's site-packages names the directories ours come from."""
    ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    inner = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(inner, "prime_mini_outer.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")


@NO_BWRAP_AT_ALL
def test_hostile_programs_are_contained_with_python_in_a_venv_under_tmp():
    # A new user's setup: `python3 -m venv /tmp/venv`. The sandbox's private /tmp must not hide
    # that Python (the runner could not start and the code used to run unconfined instead).
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="prime_") as tmp:
        venv = os.path.join(tmp, "venv")  # made with the usual mode 755 (a TemporaryDirectory is 700)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        see_our_packages(python)
        out = subprocess.run([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_sandbox.py",
                              "-k", BWRAP_TESTS], cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = out.stdout + out.stderr
    assert f"code sandbox: bwrap (Python {python})" in report, f"no bubblewrap from the venv:\n{report[-3000:]}"
    assert out.returncode == 0, report[-3000:]
    skipped = [line for line in report.splitlines() if line.startswith("SKIPPED") and "bubblewrap" in line]
    assert not skipped, f"bwrap tests skipped with Python in the venv: {skipped}"


@NO_BWRAP_AT_ALL
def test_bwrap_runs_a_venv_with_its_own_interpreter_under_tmp():
    # `--copies`: the interpreter itself lives under /tmp, its standard library in the base Python.
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="prime_") as tmp:
        venv = os.path.join(tmp, "venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--copies", venv], check=True)
        probe = "import sandbox; print(sandbox.bwrap_problem())"
        out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", probe], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert out.stdout.strip() == "None", out.stdout + out.stderr


def test_bwrap_that_cannot_run_stops_the_program_and_reports_its_own_error(broken_bwrap, tmp_path):
    assert broken_bwrap in sandbox.bwrap_problem(), sandbox.bwrap_problem()
    target = tmp_path / "written_outside.txt"
    program = f"open({str(target)!r}, 'w').write('x')\nprint(3)"
    result = sandbox.run_tests(program, {"inputs": ["1 2\n"], "outputs": ["3\n"]}, limits("bwrap"))
    assert result["error"] == "sandbox_error" and broken_bwrap in result["detail"], result
    assert not target.exists(), "the program ran unconfined"
    assert "--sandbox rlimit" in sandbox.bwrap_error(sandbox.bwrap_problem()), "the message names the opt-in"


def test_missing_bwrap_stops_the_program(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap here
    monkeypatch.setattr(sandbox, "_PROBE", {})
    assert sandbox.bwrap_problem() == "bwrap is not installed (no `bwrap` on PATH)"
    assert verifiers.code_reward("print(3)", ONE_TEST, limits("bwrap")) == (0.0, "sandbox_error")
