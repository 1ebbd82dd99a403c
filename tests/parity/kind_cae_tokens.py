"""Parity runners for CAE's token side: the block-wise mask generator (statistics) and
the DALL-E encoder used as the tokenizer (values)."""
import numpy as np
import paddle

from paddle_cae.data.masking import BlockMaskGenerator
from paddle_cae.fast import accelerate
from paddle_cae.models.dalle import load_dalle_encoder, map_pixels

DRAWS = 2000
SEED = 20240611
MAX_STANDARD_ERRORS = 4.0
# runtime flags of the reference constructor that do not change the numbers on CPU
DALLE_RUNTIME_ARGS = ("device", "requires_grad", "use_mixed_precision")


# ------------------------------------------------------------------------ mask statistics
def connected_components(mask, eight=False):
    """Components of the masked cells of a 2-D 0/1 array: list of (size, bbox area)."""
    height, width = mask.shape
    cells_on = mask.astype(bool).tolist()  # plain lists: much faster to index than numpy
    seen = [[False] * width for _ in range(height)]
    if eight:
        steps = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    else:
        steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    components = []
    for r0 in range(height):
        for c0 in range(width):
            if not cells_on[r0][c0] or seen[r0][c0]:
                continue
            seen[r0][c0] = True
            stack, size = [(r0, c0)], 0
            top, bottom, left, right = r0, r0, c0, c0
            while stack:
                r, c = stack.pop()
                size += 1
                top, bottom, left, right = min(top, r), max(bottom, r), min(left, c), max(right, c)
                for dr, dc in steps:
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < height and 0 <= cc < width and cells_on[rr][cc] and not seen[rr][cc]:
                        seen[rr][cc] = True
                        stack.append((rr, cc))
            components.append((size, (bottom - top + 1) * (right - left + 1)))
    return components


def mask_statistics(generator, draws, rng):
    """Per-draw and per-component samples of the quantities stats.json summarises."""
    per_draw = {k: [] for k in ("masked_count", "connected_components_4conn", "connected_components_8conn",
                                "bbox_area_of_all_masked", "successful_blocks_per_mask",
                                "_mask_calls_per_mask")}
    per_component = {"size": [], "bbox_area": []}
    frequency = np.zeros(generator.get_shape())
    for _ in range(draws):
        mask, info = generator.draw(rng)
        comps4 = connected_components(mask)
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        per_draw["masked_count"].append(int(mask.sum()))
        per_draw["connected_components_4conn"].append(len(comps4))
        per_draw["connected_components_8conn"].append(len(connected_components(mask, eight=True)))
        per_draw["bbox_area_of_all_masked"].append(
            (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) if len(rows) else 0)
        per_draw["successful_blocks_per_mask"].append(info["blocks"])
        per_draw["_mask_calls_per_mask"].append(info["calls"])
        for size, area in comps4:
            per_component["size"].append(size)
            per_component["bbox_area"].append(area)
        frequency += mask
    return ({k: np.asarray(v, dtype=np.float64) for k, v in per_draw.items()},
            {k: np.asarray(v, dtype=np.float64) for k, v in per_component.items()},
            frequency / draws)


def _assert_mean_close(where, samples, reference_mean):
    mean = samples.mean()
    standard_error = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(mean - reference_mean) <= MAX_STANDARD_ERRORS * standard_error, (
        f"{where}: mean {mean:.4f} vs reference {reference_mean:.4f} "
        f"(> {MAX_STANDARD_ERRORS:g} standard errors of {standard_error:.4f})")


def run_block_mask_stats(fx):
    args = fx.model_args
    height, width = args["input_size"]
    counts = args["num_masking_patches"]
    counts = counts if isinstance(counts, list) else [counts]
    stats = fx.json("stats.json")
    for count in counts:
        ref = stats[f"{height}x{width}_{count}"]
        generator = BlockMaskGenerator(
            (height, width), count, min_num_patches=args.get("min_num_patches", 16),
            max_num_patches=args.get("max_num_patches"), min_aspect=args.get("min_aspect", 0.3),
            max_aspect=args.get("max_aspect"))
        where = f"{fx.name}/{height}x{width}_{count}"
        per_draw, per_component, frequency = mask_statistics(generator, DRAWS, np.random.default_rng(SEED + count))

        assert np.all(per_draw["masked_count"] == count), f"{where}: a draw missed the exact count"
        for name in ("connected_components_4conn", "connected_components_8conn", "bbox_area_of_all_masked",
                     "successful_blocks_per_mask", "_mask_calls_per_mask"):
            _assert_mean_close(f"{where}/{name}", per_draw[name], ref[name]["mean"])
        for name in ("size", "bbox_area"):
            _assert_mean_close(f"{where}/per_component_4conn/{name}", per_component[name],
                               ref["per_component_4conn"][name]["mean"])
        # the marginal: blocks avoid the border, so every cell is checked (binomial error)
        ref_frequency = np.asarray(ref["per_cell_mask_frequency"])
        cell_error = np.sqrt(np.clip(frequency * (1 - frequency), 1e-4, None) / DRAWS)
        worst = np.max(np.abs(frequency - ref_frequency) / cell_error)
        assert worst <= 5.0, f"{where}: per-cell frequency off by {worst:.1f} standard errors"


# -------------------------------------------------------------------------- DALL-E encoder
def run_dalle_encoder(fx):
    arch = {k: v for k, v in fx.model_args.items() if k not in DALLE_RUNTIME_ARGS}
    model = accelerate(load_dalle_encoder(fx.dir / "checkpoint.pth", **arch))
    official = fx.official_state()  # the converter's reading, checked against weights.npz
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(official), f"{fx.name}: parameter names differ from the official keys"
    for name, value in loaded.items():
        np.testing.assert_array_equal(value.numpy(), official[name], err_msg=f"{fx.name}/{name}")

    images = paddle.to_tensor(fx.input("images"))
    mapped = map_pixels(images)
    fx.check("images_mapped", mapped, expected=fx.input("images_mapped"), atol=1e-7, rtol=0)

    mapped_ref = paddle.to_tensor(fx.input("images_mapped"))
    fx.check("logits", model(mapped_ref))
    expected_tokens = fx.case["out_tokens"]
    tokens = model.get_codebook_indices(mapped_ref)                # [B, h*w]
    assert tokens.dtype == paddle.int64
    assert list(tokens.shape) == [expected_tokens.shape[0], int(np.prod(expected_tokens.shape[1:]))]
    fx.check("tokens", tokens.numpy().reshape(expected_tokens.shape))


KINDS = {
    "block_mask_stats": run_block_mask_stats,
    "dalle_encoder": run_dalle_encoder,
}
