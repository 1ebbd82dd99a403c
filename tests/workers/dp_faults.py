"""Run by tests/test_faults.py under ``paddle.distributed.launch --nproc_per_node 2``.

``--mode nosync``: gradient accumulation over 2 micro-batches through the package's Stepper,
each rank feeding different inputs; prints whether the ranks' gradients were equal (i.e.
all-reduced) after each micro-batch, with the forward inside ``stepper.autocast(i)`` as the
training loops run it.

``--mode hang``: data-parallel steps with a heartbeat each; at step 2 rank ``--bad_rank`` sleeps
without exiting (a hung rank). With ``PADDLE_PG_TIMEOUT`` set, the collective watchdog must end
the job."""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from paddle_cae.engine.stepper import Stepper  # noqa: E402
from paddle_cae.optim import build_optimizer  # noqa: E402
from paddle_cae.runtime import distributed as dist_rt  # noqa: E402
from paddle_cae.runtime.amp import Precision  # noqa: E402


def grads_equal_across_ranks(layer):
    g = layer.weight.grad.numpy().ravel().tolist()
    gathered = []
    dist.all_gather_object(gathered, g)
    return gathered[0] == gathered[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="nosync")
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--bad_rank", type=int, default=1)
    a = parser.parse_args()
    env = dist_rt.init_distributed(startup_timeout=60)
    paddle.seed(0)
    core = paddle.nn.Linear(4, 1)
    model = dist_rt.data_parallel(core, env)
    opt = build_optimizer("adamw", [{"params": core.parameters()}], lr=1e-2)
    stepper = Stepper(model, opt, Precision(None), accum_iter=a.accum)
    if a.mode in ("nosync", "forward_outside"):
        # per non-final micro-batch: were the gradients all-reduced (equal on both ranks)?
        reduced, stepped = [], []
        for i in range(2 * a.accum):
            x = paddle.full([2, 4], float(env.rank + 1) + 0.1 * i)
            # forward_outside: the forward outside no_sync, as the loops ran it before
            with stepper.autocast(i if a.mode == "nosync" else None):
                loss = model(x).mean()
            info = stepper.backward(loss, i)
            stepped.append(bool(info["stepped"]))
            if not info["stepped"]:
                reduced.append(grads_equal_across_ranks(core))
        print("RESULT " + json.dumps({"rank": env.rank, "reduced": reduced, "stepped": stepped,
                                      "in_sync": dist_rt.ranks_in_sync(core)}), flush=True)
        return
    # hang
    for i in range(6):
        if env.rank == a.bad_rank and i == 2:
            print(f"rank {env.rank} hangs at step {i}", flush=True)
            time.sleep(3600)
        x = paddle.full([2, 4], float(env.rank + 1))
        with stepper.autocast(0):
            loss = model(x).mean()
        stepper.backward(loss, a.accum - 1)
        print(f"rank {env.rank} step {i} done", flush=True)
    print("RESULT " + json.dumps({"rank": env.rank, "finished": True}), flush=True)


if __name__ == "__main__":
    main()
