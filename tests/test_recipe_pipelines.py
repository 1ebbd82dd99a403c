"""The pretraining data of the ImageNet recipe configs, built by ``main_pretrain.py``'s own
steps (the real argument parser and ``cli.pretrain.build_pretrain_dataset``), run on an
ImageNet-sized (500x375) JPEG: the entries each model takes, uint8 images at the recipe's
sizes, masks with the recipe's counts, batches of 64 and the per-sample seeding of the loader. The expected numbers are read from
the configs through the parser. (Per-image cost is measured by benchmarks/data_throughput.py,
not here.)"""
import argparse
import os
import shutil

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_cae.cli.pretrain import build_model, build_pretrain_dataset
from paddle_cae.cli.pretrain_args import parse_pretrain_args
from paddle_cae.data.loader import SeededSamples, collate_samples, derive_seed
from paddle_cae.engine.pretrain import training_inputs
from paddle_cae.methods import get_method

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain")
BATCH = 64

# config -> (method, the entries of one sample of its pipeline, those of the batch the training
# step gives the model after the method's per-batch step; CAE's model also accepts target_ids,
# which it computes itself from tokenizer_images)
RECIPES = {
    "mae_vit_base_patch16_800e.yaml": ("mae", {"images", "noise"}, {"images", "noise"}),
    "cae_base_300e.yaml": ("cae", {"images", "tokenizer_images", "bool_masked_pos"},
                           {"images", "tokenizer_images", "bool_masked_pos"}),
    "bootmae_base_800e.yaml": ("bootmae", {"images", "bool_masked_pos", "order"}, {"images", "idx_shuffle"}),
}

# a narrow variant of each recipe's model (same class, image and patch size): what the test
# asks of the model (its input_keys, its patch side, MAE's masking) does not depend on width
NARROW = {
    "mae": dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2),
    "cae": dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, regressor_depth=1,
                decoder_depth=1, decoder_num_heads=2),
    "bootmae": dict(embed_dim=32, depth=2, num_heads=2, decode_dim=32, decoder_depth=1,
                    fea_list=[0, 1], with_teacher=False),
}


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    """DATA_PATH/train/<class>/ with 64 copies of one 500x375 RGB JPEG of structured noise."""
    root = tmp_path_factory.mktemp("imagenet")
    folder = root / "train" / "n01440764"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    img = np.stack([(xx * 0.5 + yy * 0.2) % 256, (yy * 0.6) % 256, (xx * 0.3 + 80) % 256], -1)
    img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    first = folder / "im000.JPEG"
    Image.fromarray(img).save(first, quality=90)
    for i in range(1, BATCH):
        shutil.copyfile(first, folder / f"im{i:03d}.JPEG")
    with Image.open(first) as check:
        assert (check.format, check.mode, check.size) == ("JPEG", "RGB", (500, 375))
    return str(root)


def _samples(dataset, seed, indices, epoch=0):
    seeded = SeededSamples(dataset, seed=seed, epoch=epoch)  # the loader's per-sample seeding
    return [seeded[i] for i in indices]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_recipe_pipeline_on_an_imagenet_sized_jpeg(imagenet_folder, config):
    method_name, sample_entries, model_entries = RECIPES[config]
    args = parse_pretrain_args(["--config", os.path.join(CONFIG_DIR, config), "--data_path", imagenet_folder])
    assert args.method == method_name
    method = get_method(args.method)
    model = build_model(argparse.Namespace(**{**vars(args), "model_args": NARROW[method_name]}))
    patch = model.input_patch_size()
    size = int(args.input_size)
    assert size == 224 and size % patch == 0
    grid = size // patch
    n = grid * grid

    dataset = build_pretrain_dataset(args, method, patch)
    assert len(dataset) == BATCH
    samples = _samples(dataset, args.seed, range(BATCH))

    # ---- one sample
    sample = samples[0]
    assert set(sample) == sample_entries | {"labels", "replaced"}
    assert int(sample["replaced"]) < 0 and int(sample["labels"]) == 0  # the JPEG was read, not replaced
    assert sample["images"].dtype == np.uint8 and sample["images"].shape == (3, size, size)
    assert 0 < sample["images"].std()  # a crop of the picture, not a constant fill
    if method_name == "cae":
        second = int(args.second_input_size)
        assert second == size // 2
        assert sample["tokenizer_images"].dtype == np.uint8
        assert sample["tokenizer_images"].shape == (3, second, second)
    if method_name == "mae":
        noise = sample["noise"]
        assert noise.dtype == np.float32 and noise.shape == (n,)
        assert noise.min() >= 0 and noise.max() < 1 and len(np.unique(noise)) == n
    else:  # block masks of --num_mask_patches patches on the model's grid
        for s in samples:
            mask = s["bool_masked_pos"]
            assert mask.dtype == np.bool_ and mask.shape == (n,)
            assert int(mask.sum()) == int(args.num_mask_patches)
    if method_name == "bootmae":
        visible = n - int(args.num_mask_patches)
        for s in samples:
            order = s["order"]
            assert np.issubdtype(order.dtype, np.integer)
            assert sorted(order.tolist()) == list(range(n))  # a permutation of the 196 patches
            # the visible patches first, the block-masked ones after them
            assert not s["bool_masked_pos"][order[:visible]].any()
            assert s["bool_masked_pos"][order[visible:]].all()

    # ---- a batch of 64, as the loader collates it
    batch = collate_samples(samples)
    assert set(batch) == set(sample)
    for key, value in sample.items():
        value = np.asarray(value)
        assert batch[key].shape == (BATCH,) + value.shape and batch[key].dtype == value.dtype, key
    assert len({batch["images"][i].tobytes() for i in range(BATCH)}) == BATCH  # each sample its own crop
    if "bool_masked_pos" in batch:
        assert len({batch["bool_masked_pos"][i].tobytes() for i in range(BATCH)}) > 1

    # ---- what the training step hands the model: exactly the entries it declares
    conversions = dataset.transform.conversions
    inputs = training_inputs(method, model, batch, derive_seed(args.seed, 0, 0), conversions)
    assert set(inputs) == model_entries and model_entries <= set(model.input_keys)
    for key, convert in conversions.items():
        assert key in inputs and np.asarray(inputs[key]).dtype == np.float32, key
    if method_name == "bootmae":
        shuffle = np.asarray(inputs["idx_shuffle"])
        assert shuffle.shape == (BATCH, n)
        assert (np.sort(shuffle, axis=1) == np.arange(n)).all()
        assert model.mask_num == int(args.mask_num)
        # one roll for the whole batch, of the per-sample orders
        shifts = {next(k for k in range(n) if (np.roll(batch["order"][i], k) == shuffle[i]).all())
                  for i in range(BATCH)}
        assert len(shifts) == 1
    if method_name == "mae":
        # the model's masking of this noise removes mask_ratio of the patches of every sample
        assert model.mask_ratio == pytest.approx(float(args.mask_ratio))
        tokens = paddle.zeros([BATCH, n, 1])
        _, mask, _ = model.random_masking(tokens, model.mask_ratio, paddle.to_tensor(inputs["noise"]))
        removed = mask.numpy().sum(axis=1)
        assert (removed == n - int(n * (1 - float(args.mask_ratio)))).all()

    # ---- the same seed gives the same samples, from a pipeline built afresh; another seed does not
    again = collate_samples(_samples(build_pretrain_dataset(args, method, patch), args.seed, range(BATCH)))
    _assert_same(batch, again)
    other = collate_samples(_samples(dataset, args.seed + 1, range(4)))
    assert not np.array_equal(other["images"], batch["images"][:4])
    drawn = "noise" if method_name == "mae" else "bool_masked_pos"
    assert not np.array_equal(other[drawn], batch[drawn][:4])
