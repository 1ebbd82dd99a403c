"""Small files that ask a reader for gigabytes: the memory bombs the weights reader must refuse.

``write_bombs(folder, expand=...)`` writes each kind and returns ``{name: path}``; ``expand`` is
the number of bytes the compressed members unpack to (the pickle-only bombs are a few dozen bytes
whatever it is). Run as a script to print the peak memory of reading each file:

    python -m tests.bombs [--expand BYTES]
"""
import io
import os
import pickle
import resource
import struct
import zipfile

import numpy as np

from tests.torchfile import TensorView, write_torch_zip


def _long(value):
    """Pickle LONG1 opcode of ``value`` (little-endian two's complement)."""
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _call(module, name, *args):
    """Protocol-4 pickle of ``module.name(*args)``; args are already-pickled opcodes."""
    return b"c" + f"{module}\n{name}\n".encode() + b"(" + b"".join(args) + b"tR"


def _pickle(body):
    return b"\x80\x04" + body + b"."


def _deflated(src, dst):
    """The zip archive ``src`` with every member deflated (a zip bomb when members are zeros)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED,
                                                      compresslevel=9) as zout:
        for info in zin.infolist():
            with zin.open(info) as member, zout.open(info.filename, "w", force_zip64=True) as out:
                while True:
                    chunk = member.read(1 << 24)
                    if not chunk:
                        break
                    out.write(chunk)


def write_bombs(folder, expand=1 << 28):
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {}

    def put(name, data):
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "wb") as f:
            f.write(data)

    # bytearray(2 GiB) of zeros from 35 bytes
    put("bytearray.pd", _pickle(_call("builtins", "bytearray", _long(1 << 31))))
    # list(range(50 million)): 50 million int objects
    put("list_range.pd", _pickle(_call("builtins", "list", _call("builtins", "range",
                                                                 _long(50_000_000)))))
    # a memo slot numbered 268 million: the C unpickler sizes its memo array to it
    put("memo_slot.pd", _pickle(b"N" + b"r" + struct.pack("<I", 0x0FFFFFFF)))
    # an empty 2 GiB array through numpy's reconstructor
    put("reconstruct.pd", _pickle(_call("numpy.core.multiarray", "_reconstruct",
                                        b"cnumpy\nndarray\n", b"(" + _long(1 << 31) + b"t",
                                        b"C\x01b")))
    # a torch zip whose one storage is deflated zeros
    plain = os.path.join(folder, "plain.tmp")
    write_torch_zip(plain, {"model": {"w": np.zeros(expand // 4, np.float32)}})
    _deflated(plain, os.path.join(folder, "zip_bomb.pth"))
    paths["zip_bomb.pth"] = os.path.join(folder, "zip_bomb.pth")
    # a torch tensor of 4 GiB viewing a one-element storage with stride 0
    write_torch_zip(os.path.join(folder, "stride0.pth"),
                    {"model": {"w": TensorView(np.zeros(1, np.float32), 0, (1 << 15, 1 << 15),
                                               (0, 0))}})
    paths["stride0.pth"] = os.path.join(folder, "stride0.pth")
    # an .npz of deflated zeros, and one whose header declares 2 GiB in a few bytes
    with open(plain, "wb") as f:
        np.savez(f, w=np.zeros(expand, np.uint8))
    _deflated(plain, os.path.join(folder, "zip_bomb.npz"))
    paths["zip_bomb.npz"] = os.path.join(folder, "zip_bomb.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (1 << 31,)})
    with zipfile.ZipFile(os.path.join(folder, "header.npz"), "w") as archive:
        archive.writestr("w.npy", header.getvalue() + bytes(16))
    paths["header.npz"] = os.path.join(folder, "header.npz")
    os.remove(plain)
    return paths


def peak_rss_mb():
    """This process's peak resident memory in MB (VmHWM: unlike ru_maxrss, not inherited from
    the parent that started it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    import argparse
    import subprocess
    import sys
    import tempfile

    p = argparse.ArgumentParser()
    p.add_argument("--expand", type=int, default=1 << 31)
    p.add_argument("--read", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.read:  # child: read one file, print the peak memory and the outcome
        from paddle_cae.io import read_weights

        before = peak_rss_mb()
        try:
            read_weights(args.read)
            outcome = "read"
        except Exception as err:  # noqa: BLE001  the outcome is printed
            outcome = f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"
        print(f"{before:.0f} {peak_rss_mb():.0f} {outcome}")
        return
    folder = tempfile.mkdtemp(prefix="bombs_")
    for name, path in write_bombs(folder, args.expand).items():
        proc = subprocess.run([sys.executable, "-m", "tests.bombs", "--read", path],
                              capture_output=True, text=True)
        line = proc.stdout.strip() or f"- - killed ({proc.returncode}) {proc.stderr[-200:]}"
        before, after, outcome = line.split(" ", 2)
        print(f"{name:16s} {os.path.getsize(path):>10,d} bytes  peak RSS {before} -> {after} MB  "
              f"{outcome}")


if __name__ == "__main__":
    main()
