"""The start of every training entrypoint (pretraining, fine-tuning, linear probing)."""
import logging
import os

import paddle

from ..runtime import distributed as dist_rt
from ..runtime.logging import setup_console_logging

logger = logging.getLogger("paddle_cae")


EXPECT_PREFIX = "# expect:"


def demo_expectations(config_path):
    """The ``# expect: ...`` comment lines of a demo config: what the demo's numbers should look
    like (measured figures; the demo is tiny, they are not the papers' ImageNet numbers)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            return [line[len(EXPECT_PREFIX):].strip() for line in f if line.startswith(EXPECT_PREFIX)]
    except OSError:
        return []


def start_process(argv, with_demo, parse, prepare):
    """What every training entrypoint does first: the process group, console logs, the demo
    config in front of a bare command line (``with_demo(argv) -> (argv, demo config or None)``),
    ``args = parse(argv)``, ``prepare(args, env)``, the device and the seed. Returns
    (env, argv, args)."""
    env = dist_rt.init_distributed()
    setup_console_logging(env.rank)
    argv, demo_config = with_demo(argv)
    if demo_config:
        logger.info("no --data_path: running the CPU demo on the bundled digits with %s",
                    os.path.relpath(demo_config))
        for line in demo_expectations(demo_config):
            logger.info("what to expect: %s", line)
    args = parse(argv)
    prepare(args, env)
    if getattr(args, "device", None):
        paddle.set_device(args.device)
    paddle.seed(args.seed)
    return env, argv, args
