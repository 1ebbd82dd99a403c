#!/usr/bin/env python
"""Training / inference throughput, peak memory and model FLOP utilisation (MFU).

    python benchmarks/throughput.py --model mae_vit_base_patch16 --batch_size 8
    python benchmarks/throughput.py --model vit_base_patch16 --phase finetune --batch_size 8
    python benchmarks/throughput.py --model vit_base_patch16 --phase infer --infer_mode bf16
    python benchmarks/throughput.py --model vit_base_patch16 --phase finetune --nproc 2

A training step is the package's own: forward (under the autocast of ``--amp``), backward,
gradient-finiteness check and norm, optimizer step (AdamW with layer-decay groups for
fine-tuning and pretraining, LARS for the linear probe), clearing the gradients, and for
pretraining the teacher's EMA step at the method's momentum (BootMAE). Pretraining inputs are
the method's own: its pipeline's samples of random pictures, collated and on the device as
uint8 (``Method.synthetic_batch``); the step converts them to float32, runs the method's
per-batch step and passes the method's schedules of ``--epoch`` (the training loop's
``training_inputs``). Fine-tuning data is random and already in memory. Images/s = batch /
median step time after ``--warmup`` steps.

The step is the recipe's (``--recipe``, default: the model's official recipe in configs/, see
RECIPES): its drop path, layer scale, masked-patch count, ``norm_pix_loss``, gradient clipping
and, for fine-tuning, Mixup / CutMix soft targets with label smoothing (mixed inside the step,
as the official training loop does). ``--recipe none`` times the bare model defaults instead.
CAE's targets come from the DALL-E tokenizer in the step, or with ``--no_tokenizer`` from
precomputed token ids (the step without the frozen tokenizer).

``--profile [N]`` profiles one more step after the timed ones (paddle.profiler, host side) and
prints its N most expensive operators (forward ops and backward nodes, the fused kernels
included) with their share of that step's wall time.

MFU = model FLOP/s / peak FLOP/s. Model FLOPs are 2 x the multiply-adds of every matmul and
convolution of the forward (attention included), traced from the shapes of one forward
(paddle_cae/fast/flops.py); a training step counts 3x for everything that is
back-propagated and 1x for frozen parts (tokenizer, teacher, frozen encoder). The peak is the
best of a few large square fp32 matmuls, measured before and after the timed steps with the same
threads (the better of the two counts: other load on the machine can only lower it).

Peak memory: on CPU the process's high-water resident set (VmHWM, summed over processes with
``--nproc``); on GPU ``paddle.device.cuda.max_memory_allocated``.

``--nproc N`` (CPU) runs N data-parallel processes (paddle.distributed.launch, gloo), each with
``--threads / N`` threads and ``batch_size / N`` images; the gradients are averaged across them
exactly as in multi-process training.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHASES = ("pretrain", "finetune", "linprobe", "infer")
INFER_MODES = ("dynamic", "fp32", "bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16")
    p.add_argument("--batch_size", type=int, default=8, help="global batch (all processes)")
    p.add_argument("--phase", choices=PHASES, default=None,
                   help="default: pretrain for pretraining models, else finetune")
    p.add_argument("--amp", default="off", help="fp16 | bf16 | off (CPU: always fp32)")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--infer_mode", choices=INFER_MODES, default="dynamic",
                   help="infer phase: dynamic graph, exported fp32 or exported bf16 "
                        "(paddle.inference with oneDNN)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads in all (default: OMP_NUM_THREADS or all cores)")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (CPU)")
    p.add_argument("--to_static", action="store_true",
                   help="compile the forward with paddle.jit.to_static")
    p.add_argument("--fused_adamw", action="store_true",
                   help="AdamW's fused kernel path (matches the plain one to ~1e-6)")
    p.add_argument("--explicit_attention", action="store_true",
                   help="use the explicit (reference) attention path")
    p.add_argument("--recipe", default="auto",
                   help="auto (the model's official recipe, see RECIPES), none (bare model "
                        "defaults) or a YAML config whose drop_path, layer_scale_init_value, "
                        "norm_pix_loss, num_mask_patches, clip_grad, mixup, cutmix, smoothing, "
                        "layer_decay, opt_betas and weight_decay the step takes")
    p.add_argument("--no_tokenizer", action="store_true",
                   help="CAE: precomputed target token ids instead of the DALL-E tokenizer in "
                        "the step")
    p.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="N",
                   help="profile one extra step and print its N (default 15) top operators")
    p.add_argument("--model_kwargs", type=json.loads, default={},
                   help='JSON dict of constructor overrides, e.g. \'{"depth": 2}\'')
    p.add_argument("--peak_size", type=int, default=4096, help="side of the peak matmul")
    p.add_argument("--peak_gflops", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.add_argument("--epoch", type=int, default=0,
                   help="pretraining: the epoch whose schedules the step uses (BootMAE's feature "
                        "weight and teacher momentum)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _setup_threads(args):
    """Must run before paddle is imported (it pins OMP_NUM_THREADS=1 when unset)."""
    from paddle_cae.fast import switches  # (imports no paddle)

    total = args.threads or switches.bench_total_threads() \
        or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    args.threads = total
    # a data-parallel worker gets its share (set by _relaunch); the parent that launches them
    # measures the matmul peak, the MFU denominator, on all the threads
    share = max(1, total // max(1, args.nproc)) if _launched() else total
    os.environ.setdefault("OMP_NUM_THREADS", str(share))


# --------------------------------------------------------------------------- measurements
def peak_memory_mb(paddle):
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return paddle.device.cuda.max_memory_allocated() / 2 ** 20
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(paddle):
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.device.cuda.synchronize()


CPU_PEAK = {"best_cpu_s": float("inf")}
CPU_TIMES = []
PROFILE = []  # (wall s, operator rows) of the --profile step


def matmul_peak_gflops(paddle, size=4096, repeats=4):
    """Best fp32 GFLOP/s of a size x size x size matmul (wall clock). The best CPU time of
    one product is kept in CPU_PEAK for the CPU-time figures."""
    a = paddle.randn([size, size], dtype="float32")
    b = paddle.randn([size, size], dtype="float32")
    c = paddle.matmul(a, b)  # warm-up
    _sync(paddle)
    best = float("inf")
    for _ in range(repeats):
        t, cpu = time.perf_counter(), time.process_time()
        c = paddle.matmul(a, b)
        _sync(paddle)
        best = min(best, time.perf_counter() - t)
        CPU_PEAK["best_cpu_s"] = min(CPU_PEAK["best_cpu_s"], time.process_time() - cpu)
    CPU_PEAK["flops"] = 2.0 * size ** 3
    del a, b, c
    return 2.0 * size ** 3 / best / 1e9


# ------------------------------------------------------------------------------ recipes
# The official recipe whose step is timed (``--recipe auto``): (phase, model-name prefix) ->
# config; the first match wins. What the step takes from it: see recipe_settings.
RECIPES = (
    ("pretrain", "mae_", "configs/pretrain/mae_vit_base_patch16_800e.yaml"),
    ("pretrain", "cae_", "configs/pretrain/cae_base_300e.yaml"),
    ("pretrain", "bootmae_", "configs/pretrain/bootmae_base_800e.yaml"),
    ("finetune", "cae_", "configs/finetune/cae_base_patch16_224.yaml"),
    ("finetune", "bootmae_", "configs/finetune/bootmae_base_patch16_224.yaml"),
    ("finetune", "", "configs/finetune/mae_vit_base_patch16.yaml"),
)
RECIPE_KEYS = ("drop_path", "layer_scale_init_value", "norm_pix_loss", "num_mask_patches",
               "min_mask_patches_per_block", "max_mask_patches_per_block", "clip_grad", "mixup",
               "cutmix", "smoothing", "layer_decay", "opt_betas", "weight_decay", "global_pool")


def recipe_path(recipe, phase, model):
    """The YAML file of ``--recipe`` (None for 'none' and phases without one)."""
    if recipe == "none":
        return None
    if recipe != "auto":
        if not os.path.isfile(recipe):
            raise SystemExit(f"--recipe: file '{recipe}' not found (expected auto, none or a "
                             "YAML config)")
        return recipe
    for rphase, prefix, path in RECIPES:
        if rphase == phase and model.startswith(prefix):
            return os.path.join(ROOT, path)
    return None


def recipe_settings(path):
    """{key: value} of the RECIPE_KEYS the config at ``path`` sets ({} for None)."""
    if path is None:
        return {}
    from paddle_cae.runtime.config import read_yaml

    values = {k: v for k, v, _ in read_yaml(path)}
    return {k: values[k] for k in RECIPE_KEYS if values.get(k) is not None}


def recipe_model_kwargs(recipe, phase):
    """Constructor arguments a classifier recipe sets: drop path, layer scale, pooling
    (a pretraining model's come from its method, :func:`pretrain_run_args`)."""
    kwargs = {}
    if recipe.get("drop_path"):
        kwargs["drop_path_rate"] = float(recipe["drop_path"])
    if "layer_scale_init_value" in recipe:
        kwargs["init_values"] = float(recipe["layer_scale_init_value"]) or None
    if phase == "finetune" and "global_pool" in recipe:
        kwargs["global_pool"] = bool(recipe["global_pool"])
    return kwargs


# ------------------------------------------------------------------------- pretraining
def pretrain_run_args(args):
    """The pretraining run ``main_pretrain.py`` would parse for the benchmark's model: the
    recipe's config file (``--recipe``), the method's defaults, ``--input_size``. Off 224 px
    the recipe's mask counts (given for 196 patches) are scaled to the patch grid."""
    import paddle

    from paddle_cae.methods import get_method
    from paddle_cae.models.registry import create_model
    from paddle_cae.cli.pretrain_args import parse_pretrain_args

    path = recipe_path(args.recipe, "pretrain", args.model)
    argv = (["--config", path] if path else []) + ["--model", args.model,
                                                   "--input_size", str(args.input_size)]
    run = parse_pretrain_args(argv)
    run.model_args = dict(run.model_args or {}, **args.model_kwargs)
    with paddle.LazyGuard():
        run.patch_size = create_model(args.model, **run.model_args).input_patch_size()
    grid = args.input_size // run.patch_size
    if grid * grid != 196:
        method = get_method(run.method)
        for key, default in (("num_mask_patches", method.default_mask_patches),
                             ("min_mask_patches_per_block", 16), ("max_mask_patches_per_block", None),
                             ("mask_num", None)):
            value = getattr(run, key, None)
            value = default if value is None else value
            if value is not None:
                setattr(run, key, _mask_count({key: value}, key, value, grid * grid))
        run.min_mask_patches_per_block = min(run.min_mask_patches_per_block, run.num_mask_patches)
    return run


def _mask_count(recipe, key, default, num_patches):
    """A recipe's patch count (given for 196 patches) scaled to ``num_patches``."""
    count = int(recipe.get(key, default))
    return max(1, min(num_patches - 1, int(round(count * num_patches / 196.0))))


def pretrain_batch(paddle, method, run, model, batch_size, seed=0, no_tokenizer=False):
    """The method's synthetic batch (its own pipeline on random pictures, collated as the
    loader does: uint8 images) as device tensors, and its conversions. ``no_tokenizer``: a
    method whose targets come from a tokenizer gets random target ids instead."""
    import numpy as np

    batch, conversions = method.synthetic_batch(run, batch_size, seed)
    if no_tokenizer and method.needs_tokenizer:
        batch.pop("tokenizer_images", None)
        conversions.pop("tokenizer_images", None)
        n = int(np.asarray(batch["bool_masked_pos"]).shape[1])
        vocab = getattr(model, "vocab_size", None) or 8192
        batch["target_ids"] = np.random.default_rng(seed).integers(0, vocab, (batch_size, n))
    return {k: paddle.to_tensor(v) for k, v in batch.items()}, conversions


# ------------------------------------------------------------------------------- builders
def build(args, paddle, env):
    """(model, step_fn, flops_fn) for a training phase."""
    import numpy as np
    import paddle.nn.functional as F

    from paddle_cae.engine.pretrain import training_inputs
    from paddle_cae.engine.stepper import Stepper
    from paddle_cae.methods import get_method
    from paddle_cae.models.registry import create_model, model_task
    from paddle_cae.optim import build_optimizer
    from paddle_cae.optim.param_groups import param_groups
    from paddle_cae.runtime.amp import Precision, parse_amp_flag

    rng = np.random.default_rng(args.seed + env["rank"])
    local_batch = args.batch_size // env["world"]
    recipe = recipe_settings(recipe_path(args.recipe, args.phase, args.model))
    args.recipe_settings = recipe
    method = run = None
    if args.phase == "pretrain":
        if model_task(args.model) != "pretrain":
            raise SystemExit(f"{args.model} is not a pretraining model")
        run = pretrain_run_args(args)
        method = get_method(run.method)
        kwargs = method.model_kwargs(run)
    else:
        kwargs = recipe_model_kwargs(recipe, args.phase)
        kwargs.update(args.model_kwargs)
        if args.input_size != 224:
            kwargs["img_size"] = args.input_size
    with paddle.utils.unique_name.guard():
        if args.phase == "pretrain":
            model = create_model(args.model, **kwargs)
        elif args.phase == "linprobe":
            model = create_model(args.model, num_classes=1000, lin_probe=True,
                                 global_pool=False, **kwargs)
        else:
            model = create_model(args.model, num_classes=1000, **kwargs)
    from paddle_cae.fast import accelerate, accelerate_optimizer

    accelerate(model)
    tokenizer_note = None
    if args.phase == "pretrain" and method.needs_tokenizer and not args.no_tokenizer:
        from paddle_cae.models.dalle import dalle_encoder

        vocab = getattr(model, "vocab_size", None) or 8192
        with paddle.utils.unique_name.guard("tokenizer_"):
            tokenizer = dalle_encoder(vocab_size=vocab) if vocab != 8192 else dalle_encoder()
        model.set_tokenizer(accelerate(tokenizer))
        tokenizer_note = "DALL-E release architecture, random weights"
    model.train()

    if args.phase == "pretrain":
        # the real step's inputs: the loader batch converted on the device, the method's
        # per-batch step, its schedules of the epoch (BootMAE: feature weight, teacher momentum)
        loader_batch, conversions = pretrain_batch(paddle, method, run, model, local_batch,
                                                   args.seed + env["rank"], args.no_tokenizer)
        forward_kwargs = method.forward_kwargs(model, args.epoch)
        momentum = method.teacher_momentum(model, args.epoch)

        def inputs():
            return training_inputs(method, model, loader_batch, args.seed, conversions)
    else:
        images = paddle.to_tensor(rng.standard_normal(
            (local_batch, 3, args.input_size, args.input_size)).astype("float32"))
        labels = paddle.to_tensor(rng.integers(0, 1000, (local_batch,)))
        mixup = None
        if args.phase == "finetune" and (recipe.get("mixup", 0) > 0 or
                                         recipe.get("cutmix", 0) > 0):
            from paddle_cae.data.mixup import Mixup

            mixup = Mixup(float(recipe.get("mixup", 0)), float(recipe.get("cutmix", 0)),
                          label_smoothing=float(recipe.get("smoothing", 0.0)),
                          num_classes=1000, rng=np.random.RandomState(args.seed))

        def forward():
            return classification_loss(net)

    if args.phase == "linprobe":
        for name, p in model.named_parameters():
            p.stop_gradient = not name.startswith("head.")
        trainable = [p for p in model.parameters() if not p.stop_gradient]
        optimizer = build_optimizer("lars", [{"params": trainable, "weight_decay": 0.0}],
                                    lr=0.1)
    else:
        wd = float(recipe.get("weight_decay", 0.05))
        layer_decay = float(recipe.get("layer_decay", 0.75)) if args.phase == "finetune" \
            else None
        groups = param_groups(model, wd, layer_decay=layer_decay)
        optimizer = build_optimizer("adamw", groups, lr=1e-4,
                                    betas=tuple(recipe.get("opt_betas", (0.9, 0.95))),
                                    weight_decay=wd, fused=args.fused_adamw)
    accelerate_optimizer(optimizer)

    net = model
    if env["world"] > 1:
        net = paddle.DataParallel(model)
    if args.to_static:
        net_static = paddle.jit.to_static(net, full_graph=False)
        net = net_static
    if args.phase == "pretrain":
        call_model = net

        def forward():
            return call_model(inputs(), **forward_kwargs)["loss"]

    precision = Precision(parse_amp_flag(args.amp))
    clip = recipe.get("clip_grad") if args.phase != "linprobe" else None
    stepper = Stepper(net, optimizer, precision, accum_iter=1,
                      clip_grad=float(clip) if clip else None)

    def classification_loss(network):
        """Cross entropy of the classifier: against Mixup / CutMix soft targets (mixed here,
        as the official training loop does) when the recipe mixes, else hard labels with
        the recipe's label smoothing."""
        from paddle_cae.engine.losses import (label_smoothing_cross_entropy,
                                              soft_target_cross_entropy)

        if mixup is not None:
            mixed, targets = mixup(images, labels)
            return soft_target_cross_entropy(network(mixed), targets)
        if recipe.get("smoothing"):
            return label_smoothing_cross_entropy(network(images), labels,
                                                 float(recipe["smoothing"]))
        return F.cross_entropy(network(images), labels)

    def step():
        with stepper.autocast():
            loss = forward()
        info = stepper.backward(loss, 0)
        if args.phase == "pretrain" and info["stepped"] and momentum is not None:
            model.update_teacher(momentum)  # the teacher's EMA step, as the training loop

    def flops():
        from paddle_cae.fast.flops import count_flops

        with count_flops() as c:
            with stepper.autocast():
                loss = forward() if not args.to_static else _plain_forward()
        del loss
        return c

    def _plain_forward():
        if args.phase == "pretrain":
            return model(inputs(), **forward_kwargs)["loss"]
        return classification_loss(model)

    return model, step, flops, tokenizer_note


def run_training(args, paddle, env):
    model, step, flops_fn, note = build(args, paddle, env)
    count = flops_fn()  # one counted forward (dygraph), before timing
    per_step_flops = count.train_step() * env["world"]
    for _ in range(args.warmup):
        step()
    _sync(paddle)
    times = []
    for _ in range(args.steps):
        t, cpu = time.perf_counter(), time.process_time()
        step()
        _sync(paddle)
        times.append(time.perf_counter() - t)
        CPU_TIMES.append(time.process_time() - cpu)
    if args.profile:
        PROFILE.append(profile_step(paddle, step, args.profile))
    return times, per_step_flops, count, note


def run_inference(args, paddle, env):
    import numpy as np

    from paddle_cae.models.registry import create_model
    from paddle_cae.fast.flops import count_flops

    rng = np.random.default_rng(args.seed)
    kwargs = dict(args.model_kwargs)
    if args.input_size != 224:
        kwargs["img_size"] = args.input_size
    with paddle.utils.unique_name.guard():
        model = create_model(args.model, num_classes=1000, **kwargs)
    from paddle_cae.fast import accelerate

    accelerate(model).eval()
    x_np = rng.standard_normal((args.batch_size, 3, args.input_size, args.input_size)) \
        .astype("float32")
    x = paddle.to_tensor(x_np)
    with paddle.no_grad(), count_flops() as count:
        model(x)
    if args.infer_mode == "dynamic":
        def run():
            with paddle.no_grad():
                return model(x)
    else:
        from paddle_cae.inference.predict import export_inference_model
        from paddle_cae.inference.predictor import create_predictor, run_predictor

        tmp = tempfile.mkdtemp(prefix="paddle_cae_bench_")
        export_inference_model(model, tmp, args.input_size)
        predictor = create_predictor(tmp, bf16=(args.infer_mode == "bf16"),
                                     threads=int(os.environ["OMP_NUM_THREADS"]))
        del model

        def run():
            return run_predictor(predictor, x_np)
    for _ in range(args.warmup):
        run()
    _sync(paddle)
    times = []
    for _ in range(args.steps):
        t, cpu = time.perf_counter(), time.process_time()
        run()
        _sync(paddle)
        times.append(time.perf_counter() - t)
        CPU_TIMES.append(time.process_time() - cpu)
    if args.profile:
        PROFILE.append(profile_step(paddle, run, args.profile))
    return times, count.forward, count, None


# -------------------------------------------------------------------------------- profile
def _op_name(name):
    """One name per operator on Paddle 2.6 and 3.x: forward ops 'matmul dygraph' -> 'matmul',
    backward nodes 'Global_MatmulGradNode' (3.x) / 'MatmulGradNode' (2.6) -> 'MatmulGradNode',
    the fused kernels' 'CustomOpGradNode: cae_x_grad' (3.x) / 'RunCustomOpNode: ...' (2.6) ->
    'cae_x_grad'."""
    name = name.strip()
    if name.startswith("Global_"):
        name = name[len("Global_"):]
    if ": " in name and name.split(": ", 1)[0] in ("CustomOpGradNode", "RunCustomOpNode"):
        name = name.split(": ", 1)[1]
    if name.endswith(" dygraph"):
        name = name[:-len(" dygraph")]
    return name


def profile_step(paddle, step, top):
    """Run ``step`` once under paddle.profiler (host side) and return (step wall seconds,
    [(operator, calls, seconds)] sorted by time, every operator). Operator times are the
    top-level operator events (a backward node includes the kernels it runs); what is not in
    any operator (Python, autograd bookkeeping) is the step time minus their sum."""
    import paddle.profiler as profiler
    from paddle.profiler.profiler_statistic import StatisticData

    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU],
                             on_trace_ready=lambda _: None)
    restore = _record_custom_ops(profiler)
    try:
        prof.start()
        t = time.perf_counter()
        step()
        _sync(paddle)
        wall = time.perf_counter() - t
        prof.step()
        prof.stop()
    finally:
        restore()
    result = prof.profiler_result
    stats = StatisticData(result.get_data(), result.get_extra_info())
    ops = {}
    summary = stats.event_summary
    for name, item in list(summary.items.items()) + list(summary.userdefined_items.items()):
        key = _op_name(name)
        calls, ns = ops.get(key, (0, 0))
        ops[key] = (calls + item.call, ns + item.cpu_time)
    rows = sorted(((k, c, ns / 1e9) for k, (c, ns) in ops.items()), key=lambda r: -r[2])
    return wall, rows


def _record_custom_ops(profiler):
    """The forward calls of the fused kernels (paddle_cae/fast/kernels) are not operator events of the
    profiler (their backward nodes are): wrap each in a named record while profiling. Returns
    the function that unwraps them."""
    from paddle_cae.fast.kernels import extension as fused

    ext = fused._load() if fused.extension_available() else None
    if ext is None:
        return lambda: None
    saved = {name: getattr(ext, name) for name in dir(ext) if name.startswith("cae_")}

    def recorded(name, fn):
        def call(*a, **k):
            with profiler.RecordEvent(name):
                return fn(*a, **k)
        return call

    for name, fn in saved.items():
        setattr(ext, name, recorded(name, fn))

    def restore():
        for name, fn in saved.items():
            setattr(ext, name, fn)
    return restore


def format_profile(wall, rows, top):
    lines = [f"profile of one step: {wall:.3f} s wall (profiler on); top {top} operators",
             "| operator | calls | ms | share of step |", "|---|---|---|---|"]
    for name, calls, sec in rows[:top]:
        lines.append(f"| {name} | {calls} | {1e3 * sec:.1f} | {100 * sec / wall:.1f}% |")
    rest = sum(sec for _, _, sec in rows[top:])
    covered = sum(sec for _, _, sec in rows)
    lines.append(f"| {len(rows) - top if len(rows) > top else 0} other operators | | {1e3 * rest:.1f} "
                 f"| {100 * rest / wall:.1f}% |")
    lines.append(f"| outside operators (Python, autograd) | | {1e3 * max(0.0, wall - covered):.1f} "
                 f"| {100 * max(0.0, wall - covered) / wall:.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main
def _launched():
    return "PADDLE_TRAINER_ID" in os.environ and int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1


def _relaunch(args, argv, peak, paddle):
    """Start ``--nproc`` data-parallel copies of this script under paddle.distributed.launch.
    The peak is measured here before and after the run (the better of the two counts, as in a
    single-process run) and the workers' MFU is restated against it."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, args.threads // args.nproc))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log_dir = tempfile.mkdtemp(prefix="paddle_cae_bench_log_")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
           str(args.nproc), "--log_dir", log_dir, os.path.abspath(__file__)] + \
        [a for a in argv if a != "--json"] + \
        ["--json", "--peak_gflops", f"{peak:.3f}", "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], file=sys.stderr)
        return proc.returncode
    if not args.peak_given:
        peak = max(peak, matmul_peak_gflops(paddle, args.peak_size))
    with open(os.path.join(log_dir, "workerlog.0"), encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    results = [json.loads(line) for line in lines if line.startswith("{")]
    for r in results:
        r["peak_gflops"] = peak
        r["mfu"] = r["achieved_gflops"] / peak
        print(HEADER)
        print(format_row(r))
    for line in lines:
        if line.startswith("note:"):
            print(line, end="")
    if args.json:
        for r in results:
            print(json.dumps(r))
    return 0


def _fused_kernels_state():
    from paddle_cae.fast.kernels import extension as fused

    return bool(fused.extension_available())


def format_row(r):
    return (f"| {r['model']} | {r['phase']}{'/' + r['infer_mode'] if r['phase'] == 'infer' else ''} "
            f"| {r['batch_size']} | {r['input_size']} | {r['nproc']}x{r['threads_per_proc']} "
            f"| {r['images_per_s']:.2f} | {r['step_s_median']:.3f} | {r['peak_mem_mb']:.0f} "
            f"| {r['model_tflops_per_step']:.3f} | {r['achieved_gflops']:.0f} "
            f"| {r['peak_gflops']:.0f} | {100 * r['mfu']:.1f}% |")


HEADER = ("| model | phase | batch | px | procs x threads | img/s | step s (median) | peak MB "
          "| TFLOP/step | GFLOP/s | peak GFLOP/s | MFU |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if ROOT not in sys.path:  # before _setup_threads, which reads the package's switches
        sys.path.insert(0, ROOT)
    _setup_threads(args)
    if args.explicit_attention:
        os.environ["PADDLE_CAE_ATTENTION"] = "explicit"
    import paddle

    from paddle_cae.fast import switches
    from paddle_cae.models.registry import model_task

    paddle.seed(args.seed)
    if args.phase is None:
        args.phase = "pretrain" if model_task(args.model) == "pretrain" else "finetune"
    if args.phase == "infer" and args.nproc > 1:
        raise SystemExit("--nproc applies to training phases")
    if args.batch_size % args.nproc:
        raise SystemExit("--batch_size must be divisible by --nproc")

    env = {"rank": 0, "world": 1}
    if args.nproc > 1 and not _launched():
        args.peak_given = args.peak_gflops is not None
        peak = args.peak_gflops or matmul_peak_gflops(paddle, args.peak_size)
        return _relaunch(args, argv, peak, paddle)
    if _launched():
        import paddle.distributed as dist

        dist.init_parallel_env()
        env = {"rank": dist.get_rank(), "world": dist.get_world_size()}
    args.peak_given = args.peak_gflops is not None
    if args.peak_gflops is None:
        args.peak_gflops = matmul_peak_gflops(paddle, args.peak_size)

    if args.phase == "infer":
        times, flops, count, note = run_inference(args, paddle, env)
    else:
        times, flops, count, note = run_training(args, paddle, env)
    median = statistics.median(times)
    mem = peak_memory_mb(paddle)
    if not args.peak_given:
        # measured again after the timed steps; the better of the two is the machine's peak
        # (other processes on the machine can only lower a measurement)
        args.peak_gflops = max(args.peak_gflops, matmul_peak_gflops(paddle, args.peak_size))
    if env["world"] > 1:
        import paddle.distributed as dist

        t = paddle.to_tensor([mem, median], dtype="float64")
        gathered = []
        dist.all_gather(gathered, t)
        mem = float(sum(g[0] for g in gathered))
        median = float(max(g[1] for g in gathered))
        if env["rank"] != 0:
            return 0
    achieved = flops / median / 1e9
    cpu_fields = {}
    if env["world"] == 1 and CPU_TIMES and math.isfinite(CPU_PEAK["best_cpu_s"]):
        # CPU-time view: the step's CPU seconds against the peak matmul's CPU seconds. With
        # other processes on the cores, wall time counts the time this process waited for a
        # core; CPU time does not (threads spinning at a barrier still count), so this
        # estimates the figures of an unloaded machine, on the low side.
        cpu_step = statistics.median(CPU_TIMES)
        ratio = cpu_step / CPU_PEAK["best_cpu_s"]  # step cost in units of one peak matmul
        cpu_mfu = (flops / CPU_PEAK["flops"]) / ratio
        cpu_fields = {"step_cpu_s_median": cpu_step, "mfu_cpu_time": cpu_mfu,
                      "images_per_s_cpu_time": args.batch_size * int(
                          os.environ.get("OMP_NUM_THREADS", 1)) / cpu_step}
    result = {
        "model": args.model, "phase": args.phase, "infer_mode": args.infer_mode,
        "batch_size": args.batch_size, "input_size": args.input_size, "amp": args.amp,
        "nproc": env["world"], "threads_per_proc": int(os.environ.get("OMP_NUM_THREADS", 1)),
        "to_static": args.to_static, "fused_adamw": args.fused_adamw,
        "recipe": getattr(args, "recipe_settings", None), "no_tokenizer": args.no_tokenizer,
        "attention": switches.attention_mode(),
        "images_per_s": args.batch_size / median, "step_s_median": median,
        "step_s_all": [round(t, 4) for t in times], "peak_mem_mb": mem,
        "model_tflops_per_step": flops / 1e12,
        "forward_gflops_trainable": count.trainable / 1e9 * (env["world"]),
        "forward_gflops_frozen": count.frozen / 1e9 * (env["world"]),
        "achieved_gflops": achieved, "peak_gflops": args.peak_gflops,
        "mfu": achieved / args.peak_gflops, "device": paddle.device.get_device(),
        "paddle": paddle.__version__, "note": note,
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "fused_kernels": _fused_kernels_state(),
        "mkl_debug_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
        **cpu_fields,
    }
    print(HEADER)
    print(format_row(result))
    if "mfu_cpu_time" in result:
        print(f"CPU-time view (load {result['loadavg_1min']}): {result['step_cpu_s_median']:.3f} "
              f"CPU-s per step = {result['images_per_s_cpu_time']:.2f} img/s at full cores, "
              f"MFU {100 * result['mfu_cpu_time']:.1f}%")
    if note:
        print(f"note: {note}")
    if PROFILE:
        wall, rows = PROFILE[0]
        print(format_profile(wall, rows, args.profile))
        result["profile"] = {"step_s": wall, "top": [
            {"op": name, "calls": calls, "s": sec, "share": sec / wall}
            for name, calls, sec in rows[:args.profile]]}
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
