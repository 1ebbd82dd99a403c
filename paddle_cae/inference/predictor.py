"""Paddle Inference predictors for exported models (``paddle.jit.save`` output).

:func:`create_predictor` turns an exported model into a predictor with the fast CPU path
switched on: the graph optimisation passes and oneDNN (MKLDNN) kernels, and optionally
bfloat16 oneDNN kernels. bf16 is only worth it (and only numerically safe to pick by
default) where the CPU computes bf16 dot products natively, i.e. it reports ``amx_bf16`` or
``avx512_bf16`` in /proc/cpuinfo; elsewhere oneDNN would emulate it and run slower than
fp32. ``bf16=None`` (auto) enables it exactly on such CPUs; bf16 changes the numbers (ViT-B
logits move by a few 1e-2, top-1 rarely), so pass ``bf16=False`` for fp32 numerics (a caller
that honours ``PADDLE_CAE_INFER_BF16=0`` passes ``auto_bf16=paddle_cae.fast.switches.infer_bf16()``).

On a GPU build with a visible GPU the predictor runs on the GPU instead (fp32; oneDNN options
do not apply).
"""
import os

import numpy as np

from .._cpu_math import cpu_flags

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16(flags=None):
    """True when the CPU has native bf16 dot products (AMX or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def model_files(model_dir):
    """(program, params) of an export: ``model_dir`` is a folder holding one
    ``<name>.json``/``<name>.pdmodel`` + ``<name>.pdiparams`` pair (``inference`` preferred)
    or a path prefix ``<dir>/<name>``."""
    model_dir = os.fspath(model_dir)
    candidates = []
    if os.path.isdir(model_dir):
        stems = sorted({os.path.splitext(f)[0] for f in os.listdir(model_dir)
                        if f.endswith(".pdiparams")})
        stems.sort(key=lambda s: s != "inference")
        candidates = [os.path.join(model_dir, s) for s in stems]
    else:
        candidates = [model_dir]
    for prefix in candidates:
        for ext in (".json", ".pdmodel"):
            if os.path.isfile(prefix + ext) and os.path.isfile(prefix + ".pdiparams"):
                return prefix + ext, prefix + ".pdiparams"
    raise FileNotFoundError(f"{model_dir}: no exported model (<name>.json or <name>.pdmodel with "
                            "<name>.pdiparams)")


def _gpu_available():
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def resolve_bf16(bf16=None, flags=None, auto=True):
    """Whether a predictor will use bf16: ``True``/``False`` as given (True on a CPU without
    native bf16 raises); ``None`` -> on when the CPU has native bf16, unless ``auto`` is
    False."""
    native = cpu_has_bf16(flags)
    if bf16 is None:
        return native and bool(auto)
    if bf16 and not native:
        raise RuntimeError("bf16 inference needs a CPU with amx_bf16 or avx512_bf16; this one "
                           "has neither (see /proc/cpuinfo)")
    return bool(bf16)


def create_predictor(model_dir, bf16=None, threads=None, use_gpu=None, ir_optim=True,
                     onednn=True, auto_bf16=True):
    """A ``paddle.inference`` predictor for the export in ``model_dir`` (folder or prefix).

    bf16: True / False / None (auto, unless ``auto_bf16`` is False: see :func:`resolve_bf16`). threads: CPU math threads
    (default: ``OMP_NUM_THREADS`` or all cores). ``onednn=False`` / ``ir_optim=False`` give the
    plain reference kernels (the numerics of the dynamic graph). Returns the predictor; its
    ``.bf16`` attribute tells whether bf16 was enabled."""
    from paddle import inference

    program, params = model_files(model_dir)
    config = inference.Config(program, params)
    gpu = _gpu_available() if use_gpu is None else bool(use_gpu)
    use_bf16 = False
    if gpu:
        config.enable_use_gpu(256, 0)
    else:
        config.disable_gpu()
        if threads is None:
            threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
        config.set_cpu_math_library_num_threads(int(threads))
        if onednn:
            config.enable_mkldnn()
            use_bf16 = resolve_bf16(bf16, auto=auto_bf16)
            if use_bf16:
                config.enable_mkldnn_bfloat16()
        elif bf16:
            raise ValueError("bf16 inference runs through oneDNN: leave onednn=True")
    config.switch_ir_optim(bool(ir_optim))
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    try:
        predictor.bf16 = use_bf16
    except AttributeError:  # a pybind object without a __dict__
        pass
    return predictor


def run_predictor(predictor, batch):
    """Feed one numpy batch (first input) and return the first output as numpy."""
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(batch.shape))
    handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


__all__ = ["cpu_flags", "cpu_has_bf16", "create_predictor", "model_files", "resolve_bf16",
           "run_predictor"]
