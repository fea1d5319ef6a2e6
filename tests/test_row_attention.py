"""The row path of paged attention (every token of the short sequences one row of the paged row
kernel, long sequences through SDPA) against the reference path, on the CPU with
torch_paged_decode as the row backend. The engine-level check is in test_engine_exact.py."""

from __future__ import annotations

import torch

from omnistream.layers.attention import AttentionMetadata, paged_attention, reference_attention, row_layout, write_kv
from omnistream.layers.paged_decode import torch_paged_decode

BS, H, KVH, D = 4, 4, 2, 16  # block size, heads, kv heads (GQA 2), head dim
NUM_BLOCKS = 96


def _mixed_batch(gen: torch.Generator):
    """Sequences (cached tokens, new tokens), short ones first as the runner orders them:
    three decodes, short chunks with and without a cached prefix, then two long chunks."""
    seqs = [(8, 1), (17, 1), (0, 1), (10, 5), (0, 7), (21, 3), (12, 30), (0, 20)]
    num_row_seqs = 6
    perm = torch.randperm(NUM_BLOCKS, generator=gen)  # scattered, disjoint blocks
    tables, used = [], 0
    for cached, new in seqs:
        n = -(-(cached + new) // BS) + 1  # one spare block, as a grown table may have
        tables.append(perm[used : used + n])
        used += n
    return seqs, num_row_seqs, tables


def _metadata(seqs, num_row_seqs, tables, with_rows: bool) -> AttentionMetadata:
    slots = []
    for (cached, new), t in zip(seqs, tables):
        idx = torch.arange(cached, cached + new)
        slots.append(t[idx // BS] * BS + idx % BS)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), query_lens=[n for _, n in seqs],
        context_lens=[c + n for c, n in seqs], block_tables=tables,
    )
    if with_rows:
        width = max(len(t) for t in tables[:num_row_seqs])
        padded = torch.full((num_row_seqs, width), NUM_BLOCKS, dtype=torch.long)  # the scratch block
        for i, t in enumerate(tables[:num_row_seqs]):
            padded[i, : len(t)] = t
        meta.row_block_tables, meta.row_context_lens = row_layout(
            padded, [c for c, _ in seqs[:num_row_seqs]], [n for _, n in seqs[:num_row_seqs]])
        meta.num_row_seqs = num_row_seqs
    return meta


def test_row_layout():
    tables = torch.tensor([[3, 4, 9], [7, 9, 9]])
    rows, lens = row_layout(tables, starts=[5, 0], query_lens=[1, 3])
    assert rows.dtype == lens.dtype == torch.int32
    assert rows.tolist() == [[3, 4, 9], [7, 9, 9], [7, 9, 9], [7, 9, 9]]
    assert lens.tolist() == [6, 1, 2, 3]  # each token sees the context up to itself


def test_mixed_batch_rows_equal_reference():
    gen = torch.Generator().manual_seed(0)
    seqs, num_row_seqs, tables = _mixed_batch(gen)
    k_cache = torch.randn(NUM_BLOCKS + 1, BS, KVH, D, generator=gen)  # cached prefixes (and garbage)
    v_cache = torch.randn(NUM_BLOCKS + 1, BS, KVH, D, generator=gen)
    n = sum(q for _, q in seqs)
    q = torch.randn(n, H, D, generator=gen)
    k, v = torch.randn(n, KVH, D, generator=gen), torch.randn(n, KVH, D, generator=gen)
    meta = _metadata(seqs, num_row_seqs, tables, with_rows=True)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)  # the step's K/V first, as the model does
    ref = reference_attention(q, k, v, k_cache, v_cache, _metadata(seqs, num_row_seqs, tables, False), 0.25)
    rows = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25, torch_paged_decode)
    assert meta.num_rows == sum(q for _, q in seqs[:num_row_seqs])
    assert torch.allclose(rows, ref, rtol=1e-5, atol=1e-5), (rows - ref).abs().max()
    # without a backend (or row metadata) the dispatch is the reference path itself
    assert torch.equal(paged_attention(q, k, v, k_cache, v_cache, meta, 0.25, None), ref)


def test_all_rows_returns_the_kernel_output():
    """A step of short sequences only: the row output is the attention output (no copy)."""
    gen = torch.Generator().manual_seed(1)
    seqs, _, tables = _mixed_batch(gen)
    seqs, tables = seqs[:6], tables[:6]
    k_cache, v_cache = torch.randn(2, NUM_BLOCKS + 1, BS, KVH, D, generator=gen)
    n = sum(q for _, q in seqs)
    q, k, v = torch.randn(n, H, D, generator=gen), torch.randn(n, KVH, D, generator=gen), torch.randn(n, KVH, D, generator=gen)
    meta = _metadata(seqs, 6, tables, with_rows=True)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    ref = reference_attention(q, k, v, k_cache, v_cache, meta, 0.25)
    assert torch.allclose(paged_attention(q, k, v, k_cache, v_cache, meta, 0.25, torch_paged_decode), ref, rtol=1e-5, atol=1e-5)


def test_row_tiles_cover_every_row_once_within_one_sequence():
    from omnistream.layers.attention import row_tiles

    qlens = [1, 20, 8, 3, 9]
    first, count = row_tiles(qlens, 8).tolist()
    seq_of_row = [i for i, n in enumerate(qlens) for _ in range(n)]
    covered = [r for f, c in zip(first, count) for r in range(f, f + c)]
    assert covered == list(range(sum(qlens)))  # every row once, in order
    assert all(1 <= c <= 8 for c in count)
    assert all(len({seq_of_row[r] for r in range(f, f + c)}) == 1 for f, c in zip(first, count))
    assert count == [1, 8, 8, 4, 8, 3, 8, 1]
