"""Windowed layout and decomposed relative-position bias (`trim.nn.windows`, `DecomposedRelPos`).

The bias takes explicit token positions so that window-wise trimming and big.LITTLE can run
attention on a subset of a grid's tokens; these tests pin that a subset gets exactly the full
grid's bias and attention restricted to it.
"""

import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from trim.nn import Attention, DecomposedRelPos, grid_positions, window_partition, window_unpartition


def test_partition_round_trip_pads_to_whole_windows():
    x = torch.randn(2, 10, 7, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 3 * 2, 16, 5)  # 10x7 padded to 12x8: 3x2 windows of 4x4
    torch.testing.assert_close(window_unpartition(windows, 4, 10, 7), x, atol=0, rtol=0)
    # window (0, 0) of the first image holds its top-left 4x4 tokens in row-major order
    torch.testing.assert_close(windows[0], x[0, :4, :4].reshape(16, 5), atol=0, rtol=0)
    # the bottom-right window of the first image is mostly padding: zeros
    last = windows[5].view(4, 4, 5)
    torch.testing.assert_close(last[:2, :3], x[0, 8:, 4:], atol=0, rtol=0)
    assert not last[2:].any() and not last[:, 3:].any()


def test_rel_pos_bias_equals_segment_anything_on_a_non_square_grid():
    rows, cols, heads, dim = 3, 5, 2, 4
    rel = DecomposedRelPos((rows, cols), dim)
    torch.nn.init.normal_(rel.height)
    torch.nn.init.normal_(rel.width)
    q = torch.randn(2, heads, rows * cols, dim)
    pos = grid_positions(rows, cols)[None]
    flat = q.reshape(2 * heads, rows * cols, dim)
    ref = add_decomposed_rel_pos(torch.zeros(2 * heads, rows * cols, rows * cols), flat, rel.height, rel.width,
                                 (rows, cols), (rows, cols))
    torch.testing.assert_close(rel(q, pos, pos), ref.view(2, heads, rows * cols, rows * cols))


def test_rel_pos_bias_of_a_subset_is_the_subset_of_the_full_bias():
    rel = DecomposedRelPos((4, 4), 8)
    torch.nn.init.normal_(rel.height)
    torch.nn.init.normal_(rel.width)
    q = torch.randn(1, 2, 16, 8)
    pos = grid_positions(4, 4)[None]
    full = rel(q, pos, pos)
    queries, keys = torch.tensor([1, 6, 15]), torch.tensor([0, 6, 9, 10, 15])
    part = rel(q[:, :, queries], pos[:, queries], pos[:, keys])
    torch.testing.assert_close(part, full[:, :, queries][..., keys])


def test_attention_on_kept_tokens_equals_masked_attention():
    """What window-wise trimming will run: kept tokens gathered with their positions give the
    same outputs as the full window with the pruned tokens masked as keys."""
    attn = Attention(16, 2, rel_pos_size=(4, 4)).eval()
    torch.nn.init.normal_(attn.rel_pos.height)
    torch.nn.init.normal_(attn.rel_pos.width)
    x = torch.randn(3, 16, 16)  # three windows of 4x4 tokens
    kept = torch.stack([torch.randperm(16)[:6].sort().values for _ in range(3)])  # six tokens per window
    keep = torch.zeros(3, 16, dtype=torch.bool).scatter_(1, kept, True)
    positions = grid_positions(4, 4)[kept]
    with torch.no_grad():
        masked = attn(x, key_keep=keep)
        physical = attn(x.gather(1, kept[..., None].expand(-1, -1, 16)), positions=positions)
        semi_cross = attn(x, query_index=kept)  # big.LITTLE: kept queries, every key
        full = attn(x)
    torch.testing.assert_close(physical, masked.gather(1, kept[..., None].expand(-1, -1, 16)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(semi_cross, full.gather(1, kept[..., None].expand(-1, -1, 16)), atol=1e-5, rtol=1e-5)
