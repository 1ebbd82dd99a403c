"""Shared machinery of the generic parity test.

A fixture folder holds ``config.json`` (with ``kind``), ``case.npz`` (``in_*`` inputs,
``out_*`` outputs, ``grad_*`` gradients) and usually ``checkpoint.pth`` / ``weights.npz``.
A *kind runner* (``tests/parity/kind_*.py``, ``KINDS = {kind: fn(fx)}``) rebuilds the
model from the config, feeds the inputs and compares through :class:`Fixture`, which
tracks what was compared: every ``out_*`` and ``grad_*`` array must be checked.
"""
import importlib
import json
import pkgutil
import re
from pathlib import Path

import numpy as np


def discover_runners():
    runners = {}
    pkg_dir = Path(__file__).parent
    for info in pkgutil.iter_modules([str(pkg_dir)]):
        if not info.name.startswith("kind_"):
            continue
        module = importlib.import_module(f"tests.parity.{info.name}")
        for kind, fn in getattr(module, "KINDS", {}).items():
            if kind in runners:
                raise RuntimeError(f"kind '{kind}' has two runners")
            runners[kind] = fn
    return runners


class Fixture:
    def __init__(self, folder):
        self.dir = Path(folder)
        self.name = self.dir.name
        self.config = json.loads((self.dir / "config.json").read_text())
        self.kind = self.config["kind"]
        self.model_args = dict(self.config.get("model_args", {}))
        case_file = self.dir / "case.npz"
        self.case = dict(np.load(case_file)) if case_file.exists() else {}
        weights_file = self.dir / "weights.npz"
        self.weights = dict(np.load(weights_file)) if weights_file.exists() else None
        tol = self.config.get("tolerance", {})
        self.atol = float(tol.get("atol", 1e-5))
        self.rtol = float(tol.get("rtol", 1e-4))
        self.grad_scale = None
        rule = tol.get("grad_rule")
        if rule:
            m = re.search(r"<=\s*([0-9.]+(?:e-?\d+)?)\s*\*\s*max", rule)
            if not m:
                raise ValueError(f"{self.name}: cannot read grad_rule {rule!r}")
            self.grad_scale = float(m.group(1))
        self.checked = set()

    # ---------------------------------------------------------------- inputs
    def input(self, name):
        return self.case["in_" + name]

    def json(self, filename):
        return json.loads((self.dir / filename).read_text())

    # ----------------------------------------------------------- checkpoints
    def official_state(self, key="model"):
        """The reference state_dict, read from checkpoint.pth by the package's converter,
        checked to be identical to weights.npz (the reading of the same tensors without
        any converter)."""
        from paddle_cae.convert import read_torch_checkpoint

        obj = read_torch_checkpoint(self.dir / "checkpoint.pth")
        state = obj[key]
        if key == "model" and self.weights is not None:
            assert sorted(state) == sorted(self.weights), (
                f"{self.name}: checkpoint.pth and weights.npz hold different keys"
            )
            for k, ref in self.weights.items():
                got = np.asarray(state[k])
                assert got.dtype == ref.dtype and got.shape == ref.shape, k
                np.testing.assert_array_equal(got, ref, err_msg=k)
        return state

    def load_into(self, model, key="model", allow_missing=()):
        """Convert the reference checkpoint with the package's converter and load it
        strictly: no key may be missing (beyond ``allow_missing``) or left unused."""
        from paddle_cae.convert import convert_state_dict

        state, report = convert_state_dict(self.official_state(key), model)
        missing = [k for k in report["missing"] if k not in allow_missing]
        assert not missing, f"{self.name}: converter left model keys missing: {missing}"
        assert not report["mismatched"], f"{self.name}: shape mismatch {report['mismatched']}"
        model.set_state_dict(state)
        return report

    # ----------------------------------------------------------- comparisons
    def check(self, name, actual, expected=None, atol=None, rtol=None):
        """Compare an output with ``out_<name>`` (or ``expected``) to the config's tolerance."""
        if expected is None:
            key = "out_" + name
            assert key in self.case, f"{self.name}: no {key} in case.npz"
            expected = self.case[key]
            self.checked.add(key)
        actual = _to_numpy(actual)
        expected = np.asarray(expected)
        assert actual.shape == expected.shape, (
            f"{self.name}/{name}: shape {actual.shape} != {expected.shape}"
        )
        if expected.dtype.kind in "biu":
            np.testing.assert_array_equal(actual, expected, err_msg=f"{self.name}/{name}")
            return
        np.testing.assert_allclose(
            actual.astype(np.float64), expected.astype(np.float64),
            atol=self.atol if atol is None else atol,
            rtol=self.rtol if rtol is None else rtol,
            err_msg=f"{self.name}/{name}",
        )

    def check_grad(self, param_name, grad):
        """Compare a gradient (already in the reference layout) with ``grad_<param_name>``."""
        key = "grad_" + param_name
        assert key in self.case, f"{self.name}: no {key} in case.npz"
        self.checked.add(key)
        ref = self.case[key].astype(np.float64)
        got = _to_numpy(grad).astype(np.float64)
        assert got.shape == ref.shape, f"{self.name}/{key}: shape {got.shape} != {ref.shape}"
        if self.grad_scale is not None:
            err = np.max(np.abs(got - ref)) if ref.size else 0.0
            bound = self.grad_scale * np.max(np.abs(ref)) if ref.size else 0.0
            assert err <= bound, f"{self.name}/{key}: max err {err:.3e} > {bound:.3e}"
        else:
            np.testing.assert_allclose(got, ref, atol=self.atol, rtol=self.rtol,
                                       err_msg=f"{self.name}/{key}")

    def check_model_grads(self, model, names=None):
        """Check the gradient of every parameter the config lists (reference names)."""
        from paddle_cae.convert import linear_weight_names

        params = dict(model.named_parameters())
        linear = linear_weight_names(model)
        names = names if names is not None else [
            k[len("grad_"):] for k in self.case if k.startswith("grad_")
        ]
        for name in names:
            assert name in params, f"{self.name}: model has no parameter {name}"
            p = params[name]
            assert p.grad is not None, f"{self.name}: no gradient reached {name}"
            g = p.grad.numpy()
            if name in linear:
                g = g.T
            self.check_grad(name, g)

    def mark_checked(self, key):
        self.checked.add(key)

    def unchecked(self):
        expected = {k for k in self.case if k.startswith(("out_", "grad_"))}
        return sorted(expected - self.checked)


def _to_numpy(x):
    if hasattr(x, "numpy"):
        return x.numpy()
    return np.asarray(x)
