#!/usr/bin/env python
"""Data-pipeline throughput: the package's pipelines beside the official-style ones.

    python tools/make_photos.py --out /tmp/photos --count 300
    python benchmarks/data_throughput.py --data_path /tmp/photos --images 128 --rounds 3

For each pipeline (MAE, CAE, BootMAE pretraining; fine-tuning) two implementations run on the
same JPEG files, the same indices and the same batch size, interleaved batch by batch (so load
from other processes on a shared machine hits all alike):

* official: the way facebookresearch/mae (and BEiT/CAE) build it, written here in numpy/PIL:
  ``Image.open(f).convert("RGB")`` (full decode), RandomResizedCrop (torchvision's draw, crop
  then resize), flip, ToTensor (uint8 copy, HWC->CHW, float32 / 255), Normalize (in place),
  float32 collate and a float32 hand-over. CAE: flip, one box resized twice (bicubic 224,
  LANCZOS 112), map_pixels for the tokenizer view and a block mask; BootMAE: MAE's crop plus a
  block mask; fine-tuning adds RandAugment (rand-m9-mstd0.5-inc1) and RandomErasing (0.25,
  pixel mode) as timm does. Masks and RandAugment use the package's implementations of the
  same algorithms on both sides (they cost the same either way).
* package: ``paddle_cae.data.datasets.ImageFolder`` with the method's pretraining transform as
  ``main_pretrain.py`` builds it (uint8 hand-over, the conversion to float32 happens in the
  training step on the device; same pixels as official; crop + resize by the package's exact C
  resampler where it is built, swapped in by ``paddle_cae.fast.data.accelerate_dataset`` as
  ``main_pretrain.py`` does), and in their own columns with
  ``fast_decode`` (reduced JPEG decoding when the crop stays downsampled: few crops of
  ImageNet-sized images qualify) and ``fast_decode=0.5`` (also when the reduced crop is at
  least half the output size: changes the images more). The worker columns use the default.

Per core: one process, one thread (OMP_NUM_THREADS=1), decode + augmentation + masks +
collate + hand-over (``paddle.to_tensor`` of every array of the batch); every batch runs
``--rounds`` times (same files, same seeds) and counts with its fastest run, which filters
out the time other processes take the core away. Workers: a
``paddle.io.DataLoader`` with N worker processes and shared memory, timed from the first batch
to the last in the main process (start-up excluded). The machine's load average is printed: on
a shared machine every figure is a lower bound of what an idle core does; the ratios are the
robust part.
"""
import argparse
import math
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

METHODS = ("mae", "cae", "bootmae", "finetune")
MEAN = np.array((0.485, 0.456, 0.406), np.float32).reshape(3, 1, 1)
STD = np.array((0.229, 0.224, 0.225), np.float32).reshape(3, 1, 1)
HALF = np.full((3, 1, 1), 0.5, np.float32)

# what the GPUs consume: MAE-B training step ~59 GFLOP/image, an A100 at 40 % of
# 312 TFLOP/s fp16 -> ~2,100 img/s per GPU
GPU_IMG_PER_S = 312e12 * 0.40 / 59e9


# ------------------------------------------------------------------ official-style pipelines
def official_params(width, height, scale, ratio, rng):
    """torchvision RandomResizedCrop.get_params: 10 tries, then the clamped centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def official_load(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def official_to_tensor(img):
    """torchvision ToTensor: uint8 copy, HWC -> CHW contiguous, float32 cast, / 255 (new array)."""
    arr = np.array(img, np.uint8, copy=True)
    x = np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float32)
    return x / np.float32(255.0)


def official_normalize(x, mean, std):
    """torchvision Normalize(inplace=False): a clone, then sub_ and div_ in place."""
    x = x.copy()
    x -= mean
    x /= std
    return x


class Official:
    """One sample of the official-style pipeline ``kind`` from a file path and a seed."""

    def __init__(self, kind, size=224, mask=None):
        from paddle_cae.data.transforms import RandAugment

        self.kind, self.size, self.mask = kind, size, mask
        if kind == "finetune":
            fill = tuple(min(255, round(255 * m)) for m in MEAN.ravel())
            self.randaug = RandAugment.from_string("rand-m9-mstd0.5-inc1", fill=fill)

    def __call__(self, path, seed):
        from paddle_cae.data.transforms import sample_rng

        rng = random.Random(seed)
        img = official_load(path)
        size = (self.size, self.size)
        sample = {}
        if self.kind == "cae":
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            top, left, h, w = official_params(*img.size, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            box = (left, top, left + w, top + h)
            view = img.crop(box).resize(size, Image.BICUBIC)
            second = img.crop(box).resize((self.size // 2, self.size // 2), Image.LANCZOS)
            sample["images"] = official_normalize(official_to_tensor(view), HALF, HALF)
            sample["tokenizer_images"] = official_to_tensor(second) * 0.8 + 0.1
            sample["bool_masked_pos"] = self.mask(rng=rng).reshape(-1).astype(bool)
            return sample
        scale = (0.08, 1.0) if self.kind == "finetune" else (0.2, 1.0)
        top, left, h, w = official_params(*img.size, scale, (3 / 4, 4 / 3), rng)
        img = img.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.kind == "finetune":
            with sample_rng(seed):
                img = self.randaug(img)
        mean, std = (HALF, HALF) if self.kind == "bootmae" else (MEAN, STD)
        x = official_normalize(official_to_tensor(img), mean, std)
        if self.kind == "finetune" and rng.random() < 0.25:
            for _ in range(10):
                target = rng.uniform(0.02, 1 / 3) * self.size * self.size
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if ew < self.size and eh < self.size:
                    t, l = rng.randint(0, self.size - eh), rng.randint(0, self.size - ew)
                    x[:, t:t + eh, l:l + ew] = np.random.default_rng(seed).standard_normal((3, eh, ew))
                    break
        sample["images"] = x
        if self.kind == "bootmae":
            sample["bool_masked_pos"] = self.mask(rng=rng).reshape(-1).astype(bool)
        return sample


class OfficialFolder:
    def __init__(self, files, kind, size, mask=None):
        self.files, self.pipeline = files, Official(kind, size, mask)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        sample = self.pipeline(path, 1000 + index)
        sample["labels"] = np.int64(label)
        return sample


# ------------------------------------------------------------------------- package pipelines
def package_dataset(kind, data_path, size, fast_decode):
    from paddle_cae.data.datasets import build_dataset
    from paddle_cae.data.loader import SeededSamples
    from paddle_cae.data.transforms import build_finetune_transform
    from paddle_cae.fast.data import accelerate_dataset
    from paddle_cae.methods import method_for
    from paddle_cae.cli.pretrain_args import parse_pretrain_args

    if kind == "finetune":
        transform = build_finetune_transform(size)
    else:
        model = {"mae": "mae_vit_base_patch16", "cae": "cae_base_patch16_224",
                 "bootmae": "bootmae_base_patch16_224"}[kind]
        argv = ["--model", model, "--input_size", str(size), "--data_path", data_path]
        method = method_for(model)
        if size != 224 and kind != "mae":  # the recipe's mask counts, scaled to the patch grid
            fraction = (size // 16) ** 2 / 196
            argv += ["--num_mask_patches", str(max(1, round(method.default_mask_patches * fraction))),
                     "--min_mask_patches_per_block", str(max(1, round(16 * fraction)))]
            if kind == "bootmae":
                argv += ["--max_mask_patches_per_block", str(max(1, round(60 * fraction))),
                         "--mask_num", str(max(1, round(147 * fraction)))]
        args = parse_pretrain_args(argv)
        transform = method.pretrain_transform(args)
    dataset = accelerate_dataset(build_dataset("train", data_path, transform, {"fast_decode": fast_decode}))
    return SeededSamples(dataset, seed=0)


def collate(samples):
    from paddle_cae.data.loader import collate_samples

    return collate_samples(samples)


def hand_over(batch):
    import paddle

    return {k: paddle.to_tensor(v) for k, v in batch.items()}


# --------------------------------------------------------------------------------- timing
def time_per_core(dataset, indices, batch_size):
    start = time.perf_counter()
    for b in range(0, len(indices), batch_size):
        hand_over(collate([dataset[i] for i in indices[b:b + batch_size]]))
    return time.perf_counter() - start


def rate_with_workers(dataset, count, batch_size, workers):
    import paddle

    sampler = paddle.io.BatchSampler(list(range(count)), batch_size=batch_size, shuffle=False,
                                     drop_last=True)
    loader = paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                  collate_fn=collate, use_shared_memory=True)
    it = iter(loader)
    next(it)  # workers started and warm
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += int(batch["labels"].shape[0])
    elapsed = time.perf_counter() - start
    return seen / elapsed if seen else float("nan")


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True, help="folder with train/<class>/<image> (tools/make_photos.py)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--images", type=int, default=128, help="images per pipeline and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="repetitions of the same batches; each batch counts with its fastest round")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                   help="DataLoader worker counts to measure (none: per core only)")
    p.add_argument("--input_size", type=int, default=224)
    args = p.parse_args(argv)
    if args.workers and args.images < 2 * args.batch_size:
        p.error(f"--images {args.images}: the worker runs need at least two batches "
                f"(2 x --batch_size {args.batch_size}); raise --images or pass --workers without values")

    import paddle

    paddle.set_device("cpu")
    from paddle_cae.data.datasets import ImageFolder, split_folder

    files = ImageFolder(split_folder(args.data_path, "train")).samples
    count = min(args.images, len(files))
    rng = np.random.default_rng(0)
    loads = [load_average()]
    print(f"data: {len(files)} files in {args.data_path}/train; {count} images per pipeline, best of "
          f"{args.rounds} rounds per batch, batch {args.batch_size}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"{os.cpu_count()} cores")
    from paddle_cae.fast import resample

    lib = resample.library()
    print("crop + resize: " + (f"exact C resampler ({os.path.basename(resample.build_dir())})" if lib else
                               f"PIL ({resample.unavailable_reason()})"))
    rows = []
    for kind in args.methods:
        package = package_dataset(kind, args.data_path, args.input_size, False)
        mask = getattr(package.dataset.transform, "mask_generator", None)  # the same algorithm
        pipelines = {"official": OfficialFolder(files, kind, args.input_size, mask),
                     "package": package,
                     "fast_decode": package_dataset(kind, args.data_path, args.input_size, True),
                     "fast_decode=0.5": package_dataset(kind, args.data_path, args.input_size, 0.5)}
        for name, ds in pipelines.items():  # warm-up: imports, first-call costs
            time_per_core(ds, list(range(args.batch_size)), args.batch_size)
        indices = rng.choice(len(files), count, replace=False).tolist()
        starts = range(0, count, args.batch_size)
        best = {name: [math.inf] * len(starts) for name in pipelines}
        for _ in range(args.rounds):
            for k, b in enumerate(starts):  # interleaved batch by batch; the best of the rounds
                for name, ds in pipelines.items():
                    t = time_per_core(ds, indices[b:b + args.batch_size], args.batch_size)
                    best[name][k] = min(best[name][k], t)
            loads.append(load_average())
        per_core = {name: count / sum(times) for name, times in best.items()}
        workers = {}
        for n in args.workers:
            for name in ("official", "package"):
                workers[(name, n)] = rate_with_workers(pipelines[name], count, args.batch_size, n)
            loads.append(load_average())
        rows.append((kind, per_core, workers))

    variants = [name for name in rows[0][1] if name != "official"]
    head = f"{'pipeline':9s} {'official':>8s}" + "".join(f" {name:>15s} {'ratio':>5s}" for name in variants)
    head += "".join(f" {f'official {n}w':>11s} {f'package {n}w':>10s} {'ratio':>5s}" for n in args.workers)
    print(f"\nimages/s per core (1 process, 1 thread) and with N DataLoader workers\n{head}")
    for kind, per_core, workers in rows:
        off = per_core["official"]
        line = f"{kind:9s} {off:8.0f}" + "".join(f" {per_core[name]:15.0f} {per_core[name] / off:5.2f}"
                                                 for name in variants)
        for n in args.workers:
            w_off, w_pkg = workers[("official", n)], workers[("package", n)]
            line += f" {w_off:11.0f} {w_pkg:10.0f} {w_pkg / w_off:5.2f}"
        print(line)
    print(f"load average (1 min) during the run: {min(loads):.2f} - {max(loads):.2f} on "
          f"{os.cpu_count()} cores (a shared machine: absolute figures are lower bounds)")
    mae = next((r for r in rows if r[0] == "mae"), None)
    if mae is not None:
        need = 8 * GPU_IMG_PER_S
        print(f"\nMAE-B on 8 GPUs at ~{GPU_IMG_PER_S:,.0f} img/s each (59 GFLOP/img, 40 % of 312 TFLOP/s) "
              f"needs {need:,.0f} img/s per node; at the per-core rates above:")
        for name, rate in mae[1].items():
            print(f"  {name:16s} {rate:6.0f} img/s per core -> {math.ceil(need / rate):5d} cores per node")


if __name__ == "__main__":
    main()
