"""Rules of the test suite itself, read from the test files' syntax trees:

* ``@pytest.mark.slow`` sits on tests (a ``test_*`` function or a ``Test*`` class), where pytest
  reads it; on a helper it deselects nothing and the README's fast command runs the slow test;
* no test waits on a subprocess, a process or a queue with a wall-clock limit that a slow, shared
  machine can exceed (a multi-process launch may keep a hang guard of half an hour or more, for a
  rank that died and left the others waiting);
* the README's test command deselects the slow tests and ``.ci/run`` runs both that command and
  the slow tests.
"""
import ast
import functools
import threading
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = sorted((ROOT / "tests").rglob("*.py"))
HANG_GUARD_S = 1800
WAITING_CALLS = {"run", "wait", "communicate", "check_output", "check_call", "call", "join", "get"}


def _parse(source):
    """``ast.parse`` in a thread of its own: on CPython 3.11.7, called deep in the test
    runner's stack after other tests, the AST conversion raised "SystemError: AST constructor
    recursion depth mismatch"; a fresh thread starts with its own recursion depth."""
    result = {}

    def run():
        try:
            result["tree"] = ast.parse(source)
        except BaseException as err:  # handed back to the caller's thread
            result["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["tree"]


@functools.lru_cache(maxsize=None)
def _nodes(source):
    return list(ast.walk(_parse(source)))


def _is_slow_marker(node):
    target = node.func if isinstance(node, ast.Call) else node
    return isinstance(target, ast.Attribute) and target.attr == "slow" and \
        isinstance(target.value, ast.Attribute) and target.value.attr == "mark"


def misplaced_slow_markers(source, name="<test>"):
    found = []
    for node in _nodes(source):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            is_test = node.name.startswith("Test" if isinstance(node, ast.ClassDef) else "test_")
            if not is_test and any(_is_slow_marker(d) for d in node.decorator_list):
                found.append(f"{name}:{node.lineno} {node.name}")
    return found


def short_wall_clock_limits(source, name="<test>"):
    found = []
    for node in _nodes(source):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called not in WAITING_CALLS:
            continue
        limits = [kw.value for kw in node.keywords if kw.arg == "timeout"]
        if called == "join" and node.args:
            limits.append(node.args[0])
        for value in limits:
            if isinstance(value, ast.Constant) and isinstance(value.value, (int, float)) \
                    and value.value < HANG_GUARD_S:
                found.append(f"{name}:{node.lineno} {called}(timeout={value.value})")
    for node in _nodes(source):  # defaults of helpers that pass `timeout=` along
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + \
                list(node.args.defaults) + list(node.args.kw_defaults)
            for arg, default in zip(args, defaults):
                if arg.arg == "timeout" and isinstance(default, ast.Constant) and \
                        isinstance(default.value, (int, float)) and default.value < HANG_GUARD_S:
                    found.append(f"{name}:{node.lineno} {node.name}(timeout={default.value})")
    return found


def test_the_checks_catch_what_they_look_for():
    bad = ("import pytest, subprocess\n@pytest.mark.slow\ndef helper(x):\n    return x\n"
           "def test_a():\n    subprocess.run(['true'], timeout=300)\n"
           "def launch(timeout=120):\n    pass\n")
    good = ("import pytest, subprocess\n@pytest.mark.slow\ndef test_b():\n    subprocess.run(['true'])\n"
            "@pytest.mark.slow\nclass TestC:\n    pass\n")
    assert misplaced_slow_markers(bad) == ["<test>:3 helper"]
    assert len(short_wall_clock_limits(bad)) == 2
    assert misplaced_slow_markers(good) == [] and short_wall_clock_limits(good) == []


def test_slow_markers_sit_on_tests():
    found = [hit for path in TESTS
             for hit in misplaced_slow_markers(path.read_text(), path.relative_to(ROOT))]
    assert not found, "@pytest.mark.slow on something that is not a test: " + ", ".join(found)


def test_no_test_waits_with_a_short_wall_clock_limit():
    found = [hit for path in TESTS
             for hit in short_wall_clock_limits(path.read_text(), path.relative_to(ROOT))]
    assert not found, "wall-clock limits a slow machine can exceed: " + ", ".join(found)


def test_readme_command_deselects_slow_tests_and_ci_runs_both():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"python -m pytest[^\n`]*", readme)
    assert commands, "README gives no test command"
    fast = commands[0].strip()
    assert '-m "not slow"' in fast, fast
    ci = (ROOT / ".ci" / "run").read_text()
    assert fast in ci, "the README's test command is not what CI runs"
    assert re.search(r"python -m pytest -q -m slow\b", ci), "CI does not run the slow tests"
