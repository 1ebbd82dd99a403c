"""Run by tests/test_data_parallel.py under ``paddle.distributed.launch --nproc_per_node 2``:
a data-parallel model trained through the package's Stepper with loss scaling forced on (as
with ``--amp`` on a GPU); rank 1 alone sees a non-finite loss at step 1 (and, with
``--accum 2``, at a micro-batch that is not the last of its group). Prints one JSON line per
rank with what each step did, the final loss scale and whether the weights agree."""
import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from paddle_cae.engine.stepper import NonFiniteLossError, Stepper  # noqa: E402
from paddle_cae.optim import build_optimizer  # noqa: E402
from paddle_cae.runtime import distributed as dist_rt  # noqa: E402
from paddle_cae.runtime.amp import Precision  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--scaling", type=int, default=1)
    parser.add_argument("--bad_rank", type=int, default=1)
    parser.add_argument("--bad_step", type=int, default=1)
    a = parser.parse_args()
    env = dist_rt.init_distributed(startup_timeout=60)
    paddle.seed(0)
    core = paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.GELU(), paddle.nn.Linear(8, 1))
    model = dist_rt.data_parallel(core, env)
    opt = build_optimizer("adamw", [{"params": core.parameters()}], lr=1e-2, weight_decay=0.05)
    prec = Precision("float16" if a.scaling else None, device_has_amp=True)
    prec.autocast = contextlib.nullcontext  # CPU: the bookkeeping of --amp, no fp16 kernels
    stepper = Stepper(model, opt, prec, accum_iter=a.accum, clip_grad=1.0)
    steps, error = [], None
    for i in range(6):
        x = paddle.full([2, 4], float(env.rank + 1) + 0.1 * i)
        loss = model(x).square().mean()
        if env.rank == a.bad_rank and i == a.bad_step:
            loss = loss * float("inf")
        try:
            info = stepper.backward(loss, i)
        except NonFiniteLossError as err:
            error = str(err)
            break
        steps.append([bool(info["stepped"]), bool(info["skipped"]), info["loss_scale"]])
    print("RESULT " + json.dumps({
        "rank": env.rank, "steps": steps, "error": error, "scale": stepper.scaler.scale,
        "skipped": stepper.scaler.skipped_steps,
        "in_sync": dist_rt.ranks_in_sync(core) if error is None else None}), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
