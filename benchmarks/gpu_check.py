#!/usr/bin/env python
"""One prepared check of the GPU code path, for when a GPU machine is available.

    bash benchmarks/gpu_check.sh                  # real mode: one GPU, at most 8 minutes
    bash benchmarks/gpu_check.sh --dry-run        # the same code on CPU, tiny sizes, fp32

(a) parity: ``tests/test_parity.py`` (plus the AdamW and GPU-path step tests) with Paddle on
    the GPU in fp32 (TF32 off) against the CPU reference fixtures; (b) training steps of MAE-B,
    CAE-B (DALL-E tokenizer architecture, random weights), BootMAE-B and ViT-B fine-tuning at
    batch 64, 224 px, in fp16 O1 (loss scaling) and bf16 O1: img/s, peak memory, fraction of
    skipped steps, MFU against both the fp16 / bf16 matmul peak measured in the same run and the
    card's datasheet peak (dense, no sparsity), which attention kernel the step's attention
    layers took, and which AdamW path ran (a refused multi-tensor call is reported), and one
    row of the segmentation recipe's step (UperNet + auxiliary head on the CAE ViT-B encoder,
    512x512 crops, batch 8, fp16 O1; ``paddle_cae.downstream.bench``), reported as skipped when
    paddleseg is not installed (it lives in an environment of its own); (c) the MAE
    demo trained for 2 epochs on the GPU with AMP: does the loss fall; (d) everything in one
    JSON file (``--out``; default ``gpu_check.json`` in the current folder, and for a dry run a
    file in a new temporary folder).

The report is rewritten after every part and every training row, so a check stopped by its
time limit keeps what it had measured; parts are not started when less than ``--margin_s``
seconds are left before ``--deadline_s`` (the hard limit of gpu_check.sh), and SIGTERM from
that limit writes the report before the process ends. A part that fails is recorded with its
error and the check goes on; the exit status is 0 only when every part passed.
"""
import argparse
import importlib.util
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# (name, phase, real-size constructor kwargs, dry-run kwargs); batches are built for patch 16
MODELS = (
    ("mae_vit_base_patch16", "pretrain", {"norm_pix_loss": True},
     {"embed_dim": 64, "depth": 1, "num_heads": 4, "decoder_embed_dim": 32, "decoder_depth": 1,
      "decoder_num_heads": 4}),
    ("cae_base_patch16_224_8k_vocab", "pretrain", {},
     {"embed_dim": 64, "depth": 1, "num_heads": 4, "decoder_embed_dim": 64,
      "regressor_depth": 1, "decoder_depth": 1, "decoder_num_heads": 4, "vocab_size": 64}),
    ("bootmae_base", "pretrain", {"feature_weight": 1.0},
     {"embed_dim": 64, "depth": 2, "num_heads": 4, "decode_dim": 64, "decoder_depth": 1,
      "fea_list": [0, 1], "mask_num": 9}),
    ("vit_base_patch16", "finetune", {},
     {"embed_dim": 64, "depth": 1, "num_heads": 4}),
)

# the segmentation row (part "train"): UperNet + auxiliary FCN head on the CAE ViT-B encoder, the
# recipe's optimizer and step (paddle_cae.downstream.bench.build_step); fp16 only on a GPU
SEGMENT_MODEL = "cae_base_patch16_224"
SEGMENT_REAL = {"crop_size": 512, "num_classes": 150, "channels": 768, "model_args": {}}
SEGMENT_DRY = {"crop_size": 128, "num_classes": 8, "channels": 32,
               "model_args": {"embed_dim": 64, "depth": 4, "num_heads": 4}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="CPU, tiny models, fp32, a few steps (checks that the script runs)")
    p.add_argument("--out", default=None, help="JSON file (default: gpu_check.json in the "
                   "current folder; with --dry-run, gpu_check_dry_run.json in a new temporary "
                   "folder)")
    p.add_argument("--batch_size", type=int, default=None, help="default 64 (dry run: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model and dtype "
                   "(default 10; dry run 2)")
    p.add_argument("--seg_batch_size", type=int, default=None,
                   help="batch of the UperNet ViT-B 512 row (default 8; dry run 2)")
    p.add_argument("--deadline_s", type=float, default=480.0,
                   help="the hard limit the check runs under (gpu_check.sh: 480 s)")
    p.add_argument("--margin_s", type=float, default=40.0,
                   help="start no part (and give no sub-process time) closer than this to the "
                   "deadline, so the report is always complete")
    p.add_argument("--parts", default="parity,train,demo", help="comma list of parts to run")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ helpers
def on_gpu(paddle):
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def sync(paddle):
    if on_gpu(paddle):
        paddle.device.cuda.synchronize()


def reset_peak_memory(paddle):
    if on_gpu(paddle):
        reset = getattr(paddle.device.cuda, "reset_max_memory_allocated", None)
        if reset is not None:
            reset()


def peak_memory_mb(paddle):
    from throughput import peak_memory_mb as measure

    return measure(paddle)


def matmul_peak_tflops(paddle, dtype, size, repeats=5):
    """Best TFLOP/s of a size^3 matmul in ``dtype`` (the MFU denominator of this machine)."""
    a = paddle.randn([size, size], dtype="float32").astype(dtype)
    b = paddle.randn([size, size], dtype="float32").astype(dtype)
    c = paddle.matmul(a, b)
    sync(paddle)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            c = paddle.matmul(a, b)
        sync(paddle)
        best = min(best, (time.perf_counter() - t) / 4)
    del a, b, c
    return 2.0 * size ** 3 / best / 1e12


# dense (no sparsity) fp16 / bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by
# a fragment of the device name Paddle reports; the figure others publish MFU against
DATASHEET_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
)


def datasheet_peak_tflops(device_name):
    """The card's datasheet dense fp16/bf16 peak, or None for a card not in the table."""
    for fragment, peak in DATASHEET_PEAK_TFLOPS:
        if fragment.lower() in str(device_name).lower():
            return peak
    return None


class Deadline:
    """Seconds left before the hard limit, less the margin that writing the report needs."""

    def __init__(self, seconds, margin):
        self.end = time.time() + seconds
        self.margin = margin

    def left(self):
        return self.end - self.margin - time.time()

    def subprocess_timeout(self, cap):
        """A sub-process's timeout: at most ``cap``, and never past the margin."""
        return max(min(cap, self.left()), 1.0)


class Report(dict):
    """The JSON report, rewritten atomically (temp file + rename) at every :meth:`save`."""

    def __init__(self, path, **fields):
        super().__init__(**fields)
        self.path = os.path.abspath(path)

    def save(self):
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self, f, indent=1)
        os.replace(tmp, self.path)


class AttentionRecorder:
    """Which kernel each attention layer's call took during one forward: ``sdpa`` (no mask and
    the default scale: flash attention in half precision on a GPU), ``sdpa_bias`` (a bias or a
    scale: Paddle >= 3.3 runs its memory-efficient or math kernel) or ``explicit`` (the
    [B, heads, N, N] matrix formed op by op: the reference path, and on Paddle < 3.3 any
    attention with a relative-position bias). The CPU kernels of a dry run replace whole blocks
    and are not counted."""

    def __init__(self, paddle, model):
        self.paddle = paddle
        self.model = model
        self.counts = {"sdpa": 0, "sdpa_bias": 0, "explicit": 0}
        self._calls = 0
        self._sdpa = 0

    def __enter__(self):
        import paddle.nn.functional as F

        self._F = F
        self._original = F.scaled_dot_product_attention
        recorder = self

        def recording(*args, **kwargs):
            recorder._sdpa += 1
            masked = kwargs.get("attn_mask") is not None or kwargs.get("scale") is not None
            recorder.counts["sdpa_bias" if masked else "sdpa"] += 1
            return recorder._original(*args, **kwargs)

        F.scaled_dot_product_attention = recording
        self._hooks = [layer.register_forward_post_hook(self._count)
                       for layer in self.model.sublayers()
                       if type(layer).__name__.endswith("Attention")
                       and hasattr(layer, "num_heads")]
        return self

    def _count(self, layer, inputs, outputs):
        self._calls += 1

    def __exit__(self, *exc):
        self._F.scaled_dot_product_attention = self._original
        for hook in self._hooks:
            hook.remove()
        self.counts["explicit"] = max(self._calls - self._sdpa, 0)
        return False


class AdamWFallbackLog(logging.Handler):
    """Collects the log lines that say the multi-tensor AdamW call was refused."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "multi-tensor" in message.lower():
            self.messages.append(message.splitlines()[0][:300])


def adamw_path(optimizer, fallback_messages):
    """Which AdamW update ran: ``multi-tensor`` (Paddle's fused_adam_ over all parameters),
    ``per-tensor (fallback: ...)`` when Paddle refused that call, ``per-tensor``,
    ``cpu-kernel`` (the package's CPU kernel) or ``fused``."""
    reason = getattr(optimizer, "multi_tensor_fallback", None)
    if reason or fallback_messages:
        return "per-tensor (fallback: " + (reason or fallback_messages[0]) + ")"
    if getattr(optimizer, "fused", False):
        return "fused"
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    choose = getattr(optimizer, "_multi_tensor_for", None)
    if first is not None and choose is not None and choose(first):
        return "multi-tensor"
    return "cpu-kernel" if getattr(optimizer, "_kernel", None) is not None else "per-tensor"


# ------------------------------------------------------------------------ (a) parity
def run_parity(dry_run, deadline):
    if importlib.util.find_spec("pytest") is None:
        return {"ok": False, "summary": "not run: pytest is not installed for this Python "
                "(gpu_check.sh installs it; or `pip install pytest`)", "failed": []}
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0", FLAGS_cudnn_deterministic="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # the fixtures of the reference code, AdamW against the PyTorch formula (its multi-tensor
    # kernel is what a GPU runs) and the GPU-path checks of the step (AMP state, op budget)
    tests = ["test_parity.py", "test_optim.py", "test_amp_gpu_path.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + [
        os.path.join(ROOT, "tests", t) for t in tests]
    t = time.time()
    timeout = deadline.subprocess_timeout(240)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"ok": False, "summary": f"stopped after {timeout:.0f} s (time limit)",
                "failed": [], "tail": out[-2000:], "seconds": round(time.time() - t, 1)}
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next((line for line in reversed(tail) if " passed" in line or " failed" in line
                    or " error" in line), tail[-1] if tail else "")
    failed = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
    return {"ok": proc.returncode == 0, "summary": summary, "failed": failed[:20],
            "seconds": round(time.time() - t, 1)}


# ----------------------------------------------------------------------- (b) training
def build_step(paddle, name, phase, kwargs, amp_dtype, batch_size, input_size, seed=0):
    """(model, stepper, step_fn, flop count) of one training step of the package."""
    import numpy as np
    import paddle.nn.functional as F

    from paddle_cae.engine.stepper import Stepper
    from paddle_cae.methods import method_for
    from paddle_cae.fast import accelerate, accelerate_optimizer
    from paddle_cae.models.registry import create_model
    from paddle_cae.optim import build_optimizer
    from paddle_cae.optim.param_groups import param_groups
    from paddle_cae.runtime.amp import Precision
    from paddle_cae.fast.flops import count_flops
    from throughput import pretrain_batch, pretrain_run_args

    from paddle_cae.engine.pretrain import training_inputs

    rng = np.random.default_rng(seed)
    paddle.seed(seed)
    kwargs = dict(kwargs)
    if input_size != 224:
        kwargs["img_size"] = input_size
    with paddle.utils.unique_name.guard():
        if phase == "pretrain":
            model = create_model(name, **kwargs)
        else:
            model = create_model(name, num_classes=1000, **kwargs)
    if phase == "pretrain" and method_for(name).needs_tokenizer:
        from paddle_cae.models.dalle import dalle_encoder

        vocab = getattr(model, "vocab_size", None) or 8192
        with paddle.utils.unique_name.guard("tokenizer_"):
            model.set_tokenizer(accelerate(dalle_encoder(vocab_size=vocab) if vocab != 8192
                                           else dalle_encoder()))
    accelerate(model).train()
    groups = param_groups(model, 0.05, layer_decay=0.75 if phase == "finetune" else None)
    optimizer = accelerate_optimizer(build_optimizer("adamw", groups, lr=1e-4, betas=(0.9, 0.95),
                                                     weight_decay=0.05))
    precision = Precision(amp_dtype)
    stepper = Stepper(model, optimizer, precision, clip_grad=None if phase == "pretrain" else 5.0)
    momentum = None
    if phase == "pretrain":  # the training loop's inputs, schedules and teacher step
        method = method_for(name)
        run = pretrain_run_args(argparse.Namespace(model=name, recipe="none", input_size=input_size,
                                                   model_kwargs=dict(kwargs)))
        loader_batch, conversions = pretrain_batch(paddle, method, run, model, batch_size, seed)
        forward_kwargs = method.forward_kwargs(model, 0)
        momentum = method.teacher_momentum(model, 0)

        def forward():
            inputs = training_inputs(method, model, loader_batch, seed, conversions)
            return model(inputs, **forward_kwargs)["loss"]
    else:
        images = paddle.to_tensor(rng.standard_normal(
            (batch_size, 3, input_size, input_size)).astype("float32"))
        labels = paddle.to_tensor(rng.integers(0, 1000, (batch_size,)))

        def forward():
            return F.cross_entropy(model(images), labels)

    def step():
        with stepper.autocast():
            loss = forward()
        info = stepper.backward(loss, 0)
        if info["stepped"] and momentum is not None:
            model.update_teacher(momentum)
        return info

    with count_flops() as count, AttentionRecorder(paddle, model) as attention:
        with stepper.autocast():
            loss = forward()
    del loss
    return model, stepper, step, count, attention.counts


def timed_steps(paddle, stepper, step, steps, batch_size, flops, peak, datasheet_peak):
    """Time ``steps`` calls of ``step`` (after its warm-up): the row's speed, memory, loss
    scaling and MFU fields (``peak``: the measured matmul peak of the step's dtype;
    ``datasheet_peak``: the card's, None for fp32)."""
    skipped = stepper.scaler.skipped_steps
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(paddle)
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    return {
        "img_per_s": round(batch_size / median, 2),
        "step_ms": round(1000 * median, 2),
        "peak_memory_mb": round(peak_memory_mb(paddle), 1),
        "skipped_fraction": (stepper.scaler.skipped_steps - skipped) / steps,
        "loss_scale": stepper.scaler.scale if stepper.scaler.enabled else None,
        "train_gflop_per_step": round(flops / 1e9, 3),
        "mfu": round(flops / median / 1e12 / peak, 4) if peak else None,
        "mfu_datasheet": (round(flops / median / 1e12 / datasheet_peak, 4)
                          if datasheet_peak else None),
        "autocast": stepper.precision.dtype or "off",
    }


def run_training(paddle, args, deadline, dtypes, peaks, datasheet_peak, report):
    rows = report["training"] = []
    fallback = AdamWFallbackLog()
    logging.getLogger().addHandler(fallback)
    for name, phase, real_kwargs, dry_kwargs in MODELS:
        for dtype in dtypes:
            row = {"model": name, "phase": phase, "amp": dtype or "fp32",
                   "batch_size": args.batch_size, "input_size": args.input_size}
            rows.append(row)
            if deadline.left() < 20:
                row["error"] = "not run: time budget spent"
                report.save()
                continue
            model = stepper = step = None
            fallback.messages.clear()
            try:
                reset_peak_memory(paddle)
                model, stepper, step, count, attention = build_step(
                    paddle, name, phase, dry_kwargs if args.dry_run else real_kwargs, dtype,
                    args.batch_size, args.input_size)
                warmup = 1 if args.dry_run else 3
                for _ in range(warmup):
                    step()
                sync(paddle)
                row.update(timed_steps(paddle, stepper, step, args.steps, args.batch_size,
                                       count.train_step(), peaks.get(dtype or "float32"),
                                       datasheet_peak if dtype else None))
                row.update(attention=attention,
                           adamw=adamw_path(stepper.optimizer, fallback.messages))
            except Exception as err:  # record and go on with the next one
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
                row["traceback"] = traceback.format_exc()[-3000:]
            finally:
                del model, stepper, step
                if on_gpu(paddle):
                    paddle.device.cuda.empty_cache()
            report.save()
            print(json.dumps(row), flush=True)
    if deadline.left() < 20:
        rows.append({"model": "upernet_" + SEGMENT_MODEL, "phase": "segment",
                     "error": "not run: time budget spent"})
        report.save()
    else:
        fallback.messages.clear()
        rows.append(run_segmentation_row(paddle, args, peaks, datasheet_peak, fallback.messages))
        report.save()
        print(json.dumps(rows[-1]), flush=True)
    logging.getLogger().removeHandler(fallback)
    return rows


def run_segmentation_row(paddle, args, peaks, datasheet_peak, fallback_messages):
    """The UperNet ViT-B 512 training-step row (fp16 O1 on a GPU, fp32 in a dry run), measured
    like the rows above; ``skipped`` with the install line when paddleseg is not importable."""
    dtype = None if args.dry_run else "float16"
    sizes = SEGMENT_DRY if args.dry_run else SEGMENT_REAL
    row = {"model": "upernet_" + SEGMENT_MODEL, "phase": "segment", "amp": dtype or "fp32",
           "batch_size": args.seg_batch_size, "input_size": sizes["crop_size"]}
    if importlib.util.find_spec("paddleseg") is None:
        from paddle_cae.downstream import DOWNSTREAM_INSTALL

        row["skipped"] = f"paddleseg not installed: {DOWNSTREAM_INSTALL}"
        return row
    network = stepper = step = None
    try:
        from paddle_cae.downstream.bench import build_step as build_segmentation_step, counted_step

        reset_peak_memory(paddle)
        network, stepper, step, shape = build_segmentation_step(
            SEGMENT_MODEL, sizes["crop_size"], sizes["num_classes"], sizes["channels"],
            args.seg_batch_size, dtype, model_args=sizes["model_args"])
        with AttentionRecorder(paddle, network) as attention:
            flops = counted_step(network, step, shape)  # the warm-up step, counted
        for _ in range(0 if args.dry_run else 2):
            step()
        sync(paddle)
        row.update(timed_steps(paddle, stepper, step, args.steps, args.seg_batch_size, flops,
                               peaks.get(dtype or "float32"), datasheet_peak if dtype else None))
        row.update(attention=attention.counts,
                   adamw=adamw_path(stepper.optimizer, fallback_messages))
    except Exception as err:  # recorded; the report goes on
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
        row["traceback"] = traceback.format_exc()[-3000:]
    finally:
        del network, stepper, step
        if on_gpu(paddle):
            paddle.device.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------- (c) demo
def run_demo(args, workdir, deadline):
    out = os.path.join(workdir, "demo_mae")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "main_pretrain.py"), "--config",
           os.path.join(ROOT, "configs", "demo", "mae.yaml"), "--epochs", "2",
           "--warmup_epochs", "1", "--output_dir", out, "--auto_resume", "false",
           "--print_freq", "1000"]
    if args.dry_run:
        cmd += ["--amp", "false", "--max_train_step", "4", "--num_workers", "0",
                "--device", "cpu"]
    else:
        cmd += ["--amp", "true", "--device", "gpu"]
    t = time.time()
    timeout = deadline.subprocess_timeout(200)
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"stopped after {timeout:.0f} s (time limit)",
                "seconds": round(time.time() - t, 1), "command": " ".join(cmd[1:])}
    result = {"returncode": proc.returncode, "seconds": round(time.time() - t, 1),
              "command": " ".join(cmd[1:])}
    log = os.path.join(out, "log.txt")
    if proc.returncode != 0 or not os.path.isfile(log):
        result.update(ok=False, error=(proc.stdout + proc.stderr)[-3000:])
        return result
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = [r.get("train_loss") for r in records]
    result["epoch_losses"] = losses
    result["loss_falls"] = len(losses) >= 2 and None not in losses and losses[-1] < losses[0]
    # a dry run trains 4 steps per epoch: it checks that the run works, not that it learns
    result["ok"] = bool(result["loss_falls"]) or args.dry_run
    return result


# ---------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.batch_size = args.batch_size or (2 if args.dry_run else 64)
    args.steps = args.steps or (2 if args.dry_run else 10)
    args.seg_batch_size = args.seg_batch_size or (2 if args.dry_run else 8)
    args.input_size = 64 if args.dry_run else 224
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"parity", "train", "demo"}
    if unknown:
        raise SystemExit(f"gpu_check: unknown --parts {', '.join(sorted(unknown))} "
                         "(parity, train, demo)")
    deadline = Deadline(args.deadline_s, args.margin_s)
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="gpu_check_")
    if args.out is None:
        args.out = (os.path.join(workdir, "gpu_check_dry_run.json") if args.dry_run
                    else "gpu_check.json")
    report = Report(args.out, mode="dry-run" if args.dry_run else "gpu", ok=False,
                    finished=False)

    def stop(signum, frame):  # the hard limit of gpu_check.sh: keep what was measured
        report["stopped"] = f"signal {signum} after {time.time() - started:.0f} s"
        report["seconds"] = round(time.time() - started, 1)
        report.save()
        print(f"gpu_check: stopped by signal {signum}; partial report: {report.path}",
              flush=True)
        os._exit(124)

    report.save()

    import paddle
    from paddle_cae.fast import switches

    signal.signal(signal.SIGTERM, stop)  # after the import: Paddle installs its own handler

    gpu = on_gpu(paddle)
    if args.dry_run:
        paddle.set_device("cpu")
    elif not gpu:
        raise SystemExit("gpu_check: no GPU visible to Paddle (paddle.device.cuda.device_count() "
                         "is 0, or a CPU wheel is installed); use --dry-run on a CPU machine, "
                         "or `pip install -r requirements-gpu.txt` on a GPU machine")
    device = paddle.device.cuda.get_device_name() if gpu and not args.dry_run else "cpu"
    report.update({"paddle": paddle.__version__, "python": platform.python_version(),
                   "device": device,
                   "fused_cpu_kernels": switches.fused_ops()})
    dtypes = [None] if args.dry_run else ["float16", "bfloat16"]
    report["matmul_peak_tflops"] = peaks = {}
    datasheet_peak = datasheet_peak_tflops(device)
    report["datasheet_peak_tflops"] = datasheet_peak
    for dtype in dtypes:
        key = dtype or "float32"
        try:
            peaks[key] = round(matmul_peak_tflops(paddle, key, 256 if args.dry_run else 8192), 3)
        except Exception as err:
            peaks[key] = None
            report.setdefault("errors", []).append(f"peak {key}: {type(err).__name__}: {err}")
    report.save()
    ok = True
    if "parity" in parts:
        if deadline.left() > 30 or args.dry_run:
            report["parity"] = run_parity(args.dry_run, deadline)
        else:
            report["parity"] = {"ok": False, "summary": "not run: time budget spent"}
        ok &= report["parity"]["ok"]
        report.save()
        print("parity:", report["parity"]["summary"], flush=True)
    if "train" in parts:
        run_training(paddle, args, deadline, dtypes, peaks, datasheet_peak, report)
        ok &= all("error" not in row for row in report["training"])
        report.save()
    if "demo" in parts:
        if deadline.left() > 45 or args.dry_run:
            report["demo"] = run_demo(args, workdir, deadline)
            ok &= report["demo"]["ok"]
        else:
            report["demo"] = {"ok": False, "error": "not run: time budget spent"}
            ok = False
    report["ok"] = bool(ok)
    report["finished"] = True
    report["seconds"] = round(time.time() - started, 1)
    report.save()
    print(f"gpu_check: {'all parts passed' if ok else 'SOME PARTS FAILED'}; "
          f"{report['seconds']} s; report: {report.path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
