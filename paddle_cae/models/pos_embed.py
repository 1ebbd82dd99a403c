"""Fixed 2-D sin-cos position tables and resizing of position tables to a new grid.

Two layouts exist in the reference code (the same numbers with the halves swapped):
* ``"mae"``  (MAE, numpy float64): per patch [sin(c w), cos(c w), sin(r w), cos(r w)];
* ``"moco"`` (CAE, BootMAE, float32): [sin(r w), cos(r w), sin(c w), cos(c w)],
with r the patch row, c the column and w_i = 10000^(-i / (D/4)).
"""
import numpy as np
import paddle
import paddle.nn.functional as F


def sincos_pos_embed(embed_dim, grid_size, cls_token=True, layout="mae", temperature=10000.0):
    """Return a float32 numpy table [(1 +) H*W, D]; the cls row (if any) is zero."""
    h, w = (grid_size, grid_size) if np.isscalar(grid_size) else tuple(grid_size)
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    quarter = embed_dim // 4
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # raster order
    if layout == "mae":
        omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
        first, second = cols.astype(np.float64), rows.astype(np.float64)
    elif layout == "moco":
        # computed in float32 like the torch original
        omega = (1.0 / np.float32(temperature) ** (np.arange(quarter, dtype=np.float32)
                                                  / np.float32(quarter))).astype(np.float32)
        first, second = rows.astype(np.float32), cols.astype(np.float32)
    else:
        raise ValueError(f"unknown sin-cos layout {layout!r} (expected 'mae' or 'moco')")
    a = np.einsum("m,d->md", first, omega)
    b = np.einsum("m,d->md", second, omega)
    table = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1)
    table = table.astype(np.float32)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim), np.float32), table], axis=0)
    return table


def resize_pos_embed(pos_embed, new_grid, num_extra_tokens=1):
    """Bicubic resize of a [1, extra + H*W, D] table to ``new_grid`` (MAE's
    interpolate_pos_embed: extra tokens kept, align_corners False). numpy in, numpy out."""
    pos_embed = np.asarray(pos_embed, dtype=np.float32)
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:]
    old = int(round(np.sqrt(grid.shape[1])))
    if old * old != grid.shape[1]:
        raise ValueError(f"position table with {grid.shape[1]} patch rows is not a square grid")
    new_h, new_w = (new_grid, new_grid) if np.isscalar(new_grid) else tuple(new_grid)
    if (old, old) == (new_h, new_w):
        return pos_embed
    dim = grid.shape[-1]
    t = paddle.to_tensor(grid.reshape(1, old, old, dim).transpose(0, 3, 1, 2))
    t = F.interpolate(t, size=(new_h, new_w), mode="bicubic", align_corners=False)
    grid = t.numpy().transpose(0, 2, 3, 1).reshape(1, new_h * new_w, dim)
    return np.concatenate([extra, grid], axis=1).astype(np.float32)
