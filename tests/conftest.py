import logging
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_sessionstart(session):
    """Build the fused CPU kernels (paddle_cae/fast) before
    any test runs, so that no timed subprocess of a test pays for the compilation."""
    from paddle_cae.fast.kernels import extension as fused

    fused.extension_available()


@pytest.fixture(autouse=True)
def _package_logs_reach_caplog():
    """Entrypoints run in-process give the package logger its own console handler and stop
    propagation; let every test start with messages reaching pytest's log capture again."""
    logging.getLogger("paddle_cae").propagate = True
    yield


@pytest.fixture(autouse=True)
def _reference_steps_after_each_test():
    """A test that installs the fast step operations (gradient-list and EMA kernels, as
    ``paddle_cae.fast.accelerate_optimizer`` does for a run) leaves the reference ones behind."""
    yield
    from paddle_cae.models import common
    from paddle_cae.runtime import amp

    amp.use_gradient_ops(None)
    common.use_ema_tensor_update(None)
