"""The start of every training entrypoint (pretraining, fine-tuning, linear probing)."""
import logging
import os

import paddle

from ..runtime import distributed as dist_rt
from ..runtime.logging import setup_console_logging

logger = logging.getLogger("paddle_cae")


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
    args = parse(argv)
    prepare(args, env)
    if getattr(args, "device", None):
        paddle.set_device(args.device)
    paddle.seed(args.seed)
    return env, argv, args
