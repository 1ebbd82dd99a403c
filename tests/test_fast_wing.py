"""The speed wing's boundaries: the reference rooms import nothing from paddle_cae.fast, the
PADDLE_CAE_* switches are read in fast/switches.py only, and the switches parse as documented."""
import ast
from pathlib import Path

import pytest

from paddle_cae.fast import switches

PACKAGE = Path(__file__).resolve().parent.parent / "paddle_cae"
REFERENCE_ROOMS = ("models", "data", "optim", "runtime", "engine", "loading", "methods", "io",
                   "inference")
# (no exceptions: the data pipeline's crop takes the exact resampler from
# paddle_cae.fast.data.accelerate_dataset)
ALLOWED = {}


def _imports(path):
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_the_reference_rooms_import_nothing_of_the_wing():
    found = []
    for room in REFERENCE_ROOMS:
        for path in sorted((PACKAGE / room).rglob("*.py")):
            rel = path.relative_to(PACKAGE).as_posix()
            for name in _imports(path):
                if (name == "paddle_cae.fast" or name.startswith("paddle_cae.fast.")) and \
                        name not in ALLOWED.get(rel, ()):
                    found.append(f"{rel}: {name}")
    assert not found, found
    assert _imports(PACKAGE / "models" / "layers.py")  # (the walk sees imports at all)


def test_the_switches_are_read_in_one_module():
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            if "environ" in line and "PADDLE_CAE_" in line and not line.lstrip().startswith("#"):
                readers.append(path.relative_to(PACKAGE).as_posix())
    assert set(readers) <= {"fast/switches.py", "fast/__init__.py"}, readers


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False), ("off", False),
                                      (" False ", False), ("no", False), ("yes", True)])
def test_on_off_switches(value, on):
    env = {} if value is None else {"PADDLE_CAE_FUSED_OPS": value, "PADDLE_CAE_FAST_RESIZE": value,
                                    "PADDLE_CAE_MALLOC_TUNING": value}
    assert switches.fused_ops(env) is on
    assert switches.fast_resize(env) is on
    assert switches.malloc_tuning(env) is on


def test_valued_switches():
    env = {"PADDLE_CAE_ATTENTION": "Explicit", "PADDLE_CAE_RESAMPLE_ISA": "AVX2",
           "PADDLE_CAE_OPS_DIR": "/tmp/x", "PADDLE_CAE_BENCH_TOTAL_THREADS": "6"}
    assert switches.explicit_attention(env) and switches.attention_mode(env) == "Explicit"
    assert switches.resample_isa(env) == "avx2"
    assert switches.ops_dir(env) == "/tmp/x"
    assert switches.bench_total_threads(env) == 6
    assert not switches.explicit_attention({}) and switches.attention_mode({}) == "default"
    assert switches.ops_dir({}).endswith("paddle_cae/ops")
