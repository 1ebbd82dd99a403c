"""Exact, faster crop + resize for the loader: ``resample.c`` through ctypes.

:func:`crop_resize` returns what ``img.crop(box).resize(size, filter)`` followed by the uint8
HWC -> CHW copy gives, bit for bit, for an 8-bit RGB PIL image and Pillow's convolution
filters (BILINEAR, BICUBIC, LANCZOS, BOX, HAMMING), in one pass without the crop copy and with
vectorised loops (AVX-512 / AVX2 where the CPU has them). It can also mirror the source
before cropping (CAE flips the whole image first) or the output (MAE/BootMAE flip the crop).

The C source is compiled with the system C compiler (``$CC``, else ``cc``) the first time it
is needed, into ``$PADDLE_CAE_OPS_DIR`` (default ``~/.cache/paddle_cae/ops``), one folder per
source, flags and instruction set, under a file lock (concurrent first uses wait); later
processes load the library from there, and forked DataLoader workers inherit it. Before it is
used, a self-check compares it with Pillow on small random images for every filter and option;
where it cannot be built (no compiler), where that check fails (a Pillow whose arithmetic
differs) or with ``PADDLE_CAE_FAST_RESIZE=0``, :func:`crop_resize` returns None and the caller
uses PIL (logged once per process).

The pixels are read without a copy through Pillow's Arrow export (Pillow >= 11.2: RGBX, 4
bytes a pixel); with an older Pillow from ``np.asarray(img)`` (3 bytes a pixel).
"""
import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

from ..data.transforms import PILLOW
from . import native, switches

logger = logging.getLogger("paddle_cae")

_SOURCE = native.source_path("resample.c")
_ABI = 1
# Pillow's filter numbers (PIL.Image.Resampling) the C code implements
FILTERS = (Image.LANCZOS, Image.BILINEAR, Image.BICUBIC, Image.BOX, Image.HAMMING)

_ISAS = (("avx512", {"avx512f", "avx512bw", "avx512vl", "avx2", "sse4_1"},
          ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-msse4.1"]),
         ("avx2", {"avx2", "sse4_1"}, ["-mavx2", "-msse4.1"]))
_order = [0]  # the pass order of this Pillow (pass_order), found when the library loads


def enabled_by_env():
    """The ``PADDLE_CAE_FAST_RESIZE`` switch (on unless 0 / false / no / off)."""
    return switches.fast_resize()


def _isa():
    """(name, compiler flags) of the best vector code path this CPU runs; the environment
    variable ``PADDLE_CAE_RESAMPLE_ISA`` (avx512, avx2, generic) may choose a lesser one
    (tests of every code path)."""
    return native.best_isa(_ISAS, switches.resample_isa())


def _cflags():
    # -ffp-contract=off: the weights' double arithmetic must round as Pillow's (no fused
    # multiply-adds)
    return ["-O3", "-std=gnu99", "-fPIC", "-shared", "-ffp-contract=off"] + _isa()[1]


def _compiler():
    return os.environ.get("CC") or "cc"


def build_dir():
    return native.build_dir("resample", [_SOURCE], [_compiler()] + _cflags(), _isa()[0])


def _build(folder):
    """The path of the compiled library, built into ``folder`` if it is not there yet."""
    lib = os.path.join(folder, "libpc_resample.so")

    def compile_library():
        cc = _compiler()
        if shutil.which(cc) is None:
            raise RuntimeError(f"no C compiler '{cc}' (set CC)")
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            run = subprocess.run([cc] + _cflags() + [_SOURCE, "-o", tmp, "-lm"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"{cc} failed on {_SOURCE}: {run.stdout.strip()[-500:]}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    return native.build_once(folder, lib, compile_library)


def _bind(path):
    lib = ctypes.CDLL(path)
    lib.pc_abi_version.restype = ctypes.c_int
    lib.pc_vector_taps.restype = ctypes.c_int
    i, p = ctypes.c_int, ctypes.c_void_p
    f = ctypes.c_float
    lib.pc_resample.argtypes = [p, i, i, ctypes.c_int64, i, i, i, i, i, i, f, f, f, f, i, i, i, i, i, p, i]
    lib.pc_resample.restype = i
    lib.pc_arrow_rgbx.argtypes = [p, p, ctypes.c_int64]
    lib.pc_arrow_rgbx.restype = p
    if lib.pc_abi_version() != _ABI:
        raise RuntimeError(f"{path}: ABI version {lib.pc_abi_version()}, expected {_ABI}")
    return lib


def _check(lib):
    _order[0] = pass_order(lib)
    mismatch = self_check(lib)
    return f"differs from Pillow {Image.__version__}: {mismatch}" if mismatch else ""


NATIVE = native.NativeLibrary(
    "exact fast crop+resize", lambda: _bind(_build(build_dir())), check=_check,
    off_reason=lambda: None if enabled_by_env() else "PADDLE_CAE_FAST_RESIZE=0",
    fallback="the loader uses PIL's crop + resize")


def library():
    """The loaded, self-checked library, or None (see :func:`unavailable_reason`)."""
    return NATIVE.get()


def unavailable_reason():
    """Why :func:`library` is None (None when it is available or not tried yet)."""
    return NATIVE.reason


def reset():
    """Forget the loaded library (tests; the next call loads and checks again)."""
    NATIVE.reset()


# --------------------------------------------------------------------------- pixel access
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _pixels(lib, img, packed=False):
    """(address, row stride, bytes per pixel, keep-alive) of an RGB image's pixels: Pillow's
    own memory through its Arrow export when it has one (and not ``packed``), else a packed
    numpy copy."""
    w, h = img.size
    export = None if packed else getattr(img, "__arrow_c_array__", None)
    if export is not None:
        try:
            schema, array = export()
            addr = lib.pc_arrow_rgbx(_get_pointer(schema, b"arrow_schema"),
                                     _get_pointer(array, b"arrow_array"), w * h)
            if addr:
                return addr, 4 * w, 4, (schema, array)
        except Exception:  # noqa: BLE001  e.g. an image in several memory blocks
            pass
    arr = np.ascontiguousarray(np.asarray(img))
    return arr.ctypes.data, 3 * w, 3, arr


def crop_resize(img, box, size, resample, mirror_src=False, mirror_out=False, lib=None,
                scalar=False, packed=False, order=None):
    """uint8 ``[3, size[1], size[0]]``: ``img.crop(box).resize(size, resample)`` (``img``
    mirrored left-right first with ``mirror_src``: ``box`` is then a box of the mirrored
    image; the result mirrored with ``mirror_out``), as a contiguous CHW array (``scalar``,
    ``packed``, ``order``: force the scalar code, the 3-byte pixel input, a pass order; for
    tests). None when the fast code cannot do it (not available, not an RGB image, a filter
    it does not have, a box not inside the image): the caller then uses PIL."""
    left, top, right, bottom = (int(v) for v in box)
    if (left, top, right, bottom) != tuple(box):
        return None
    span = (0.0, 0.0, float(right - left), float(bottom - top))
    return _resample(img, (left, top, right, bottom), span, size, resample, mirror_src,
                     mirror_out, lib, scalar, packed, order)


def resize_box(img, box, size, resample, mirror_src=False, mirror_out=False, lib=None,
               scalar=False, packed=False, order=None):
    """uint8 ``[3, size[1], size[0]]``: ``img.resize(size, resample, box=box)`` (a float box:
    unlike a crop, the filter may read pixels outside it), mirrors and None as
    :func:`crop_resize`."""
    return _resample(img, (0, 0) + tuple(img.size), tuple(float(v) for v in box), size,
                     resample, mirror_src, mirror_out, lib, scalar, packed, order)


def _resample(img, region, span, size, resample, mirror_src, mirror_out, lib, scalar, packed,
              order):
    lib = library() if lib is None else lib
    if lib is None or img.mode != "RGB" or resample not in FILTERS:
        return None
    left, top, right, bottom = region
    out_w, out_h = int(size[0]), int(size[1])
    w, h = img.size
    b0, b1, b2, b3 = span
    if not (0 <= left < right <= w and 0 <= top < bottom <= h) or out_w < 1 or out_h < 1 or \
            not (0 <= b0 < b2 <= right - left and 0 <= b1 < b3 <= bottom - top):
        return None
    img.load()
    addr, stride, ps, keep = _pixels(lib, img, packed)
    out = np.empty((3, out_h, out_w), np.uint8)
    order = _order[0] if order is None else order
    rc = lib.pc_resample(addr, w, h, stride, ps, left, top, right - left, bottom - top,
                         int(bool(mirror_src)), b0, b1, b2, b3, out_w, out_h, int(resample),
                         int(bool(mirror_out)), int(order), out.ctypes.data, int(bool(scalar)))
    del keep
    if rc != 0:
        raise RuntimeError(f"resample.c: pc_resample returned {rc} for image {w}x{h}, region "
                           f"{region}, box {span}, size {size}, filter {resample}")
    return out


def pil_crop_resize(img, box, size, resample, mirror_src=False, mirror_out=False, span=None):
    """The reference: PIL's crop and resize (with ``span``: PIL's resize of the whole image
    with ``box=span``; ``box`` unused), uint8 CHW (:data:`paddle_cae.data.transforms.PILLOW`)."""
    return PILLOW(img, box, size, resample, mirror_src, mirror_out, span=span)


def pass_order(lib):
    """Which order of the two passes this Pillow uses (``order`` of ``pc_crop_resize``): 1
    when a resize that shrinks the height much more than the width runs the vertical pass
    first (Pillow 13), else 0 (horizontal first, Pillow up to 12). Found on an image where
    the two orders give different pixels."""
    rng = np.random.RandomState(7)
    img = Image.fromarray(rng.randint(0, 256, (31, 23, 3), dtype=np.uint8), "RGB")
    want = pil_crop_resize(img, (0, 0, 23, 31), (40, 9), Image.BILINEAR)
    got = crop_resize(img, (0, 0, 23, 31), (40, 9), Image.BILINEAR, lib=lib, order=1)
    return 1 if np.array_equal(got, want) else 0


def self_check(lib, seed=12345):
    """'' when the library gives Pillow's pixels on a few small random cases (every filter,
    up- and downsampling, mirrored source and output, 3- and 4-byte pixels, the scalar and
    the vector code); else a description of the first difference."""
    rng = np.random.RandomState(seed)
    cases = [((37, 29), (3, 2, 34, 27), (16, 20)), ((23, 31), (0, 0, 23, 31), (40, 9)),
             ((41, 17), (5, 1, 19, 17), (14, 17)), ((19, 25), (2, 3, 19, 25), (19, 11)),
             ((45, 40), (1, 0, 44, 40), (40, 6))]
    for n, ((w, h), box, size) in enumerate(cases):
        img = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        copy = Image.frombytes("RGB", (w, h), img.tobytes())  # the same pixels, not PIL's object
        for resample in FILTERS:
            mirror_src, mirror_out = n % 2 == 1, n % 3 != 1
            want = pil_crop_resize(img, box, size, resample, mirror_src, mirror_out)
            span = (box[0] + 0.37, box[1] + 0.6, box[2] - 0.25, box[3] - 1.5)
            want_span = pil_crop_resize(img, None, size, resample, mirror_src, mirror_out, span)
            got = resize_box(copy, span, size, resample, mirror_src, mirror_out, lib=lib)
            if got is None or not np.array_equal(got, want_span):
                return (f"image {w}x{h}, resize box {span}, size {size}, filter {resample}, "
                        f"mirror {mirror_src}/{mirror_out}")
            for scalar, pack in ((False, False), (False, True), (True, False)):
                got = crop_resize(copy, box, size, resample, mirror_src, mirror_out, lib=lib,
                                  scalar=scalar, packed=pack)
                if got is None or not np.array_equal(got, want):
                    return (f"image {w}x{h}, box {box}, size {size}, filter {resample}, "
                            f"mirror {mirror_src}/{mirror_out}, scalar {scalar}, 3-byte pixels {pack}")
    return ""


__all__ = ["crop_resize", "resize_box", "pil_crop_resize", "library", "enabled_by_env", "unavailable_reason",
           "self_check", "FILTERS"]

if __name__ == "__main__":  # python -m paddle_cae.fast.resample: build and check
    logging.basicConfig(level=logging.INFO)
    lib = library()
    print(f"library: {'ok' if lib else 'unavailable'} ({unavailable_reason() or build_dir()}); "
          f"vector taps {lib.pc_vector_taps() if lib else '-'}")
    sys.exit(0 if lib else 1)
