"""The Triton scan's grid plan: what a card gets at the network's shapes (pure arithmetic)."""

from __future__ import annotations

import pytest

from cmdbnet.models.scan.triton_grid import MAX_BLOCK_D, MIN_CHUNK_BLOCKS, PROGRAMS_PER_SM, plan
from cmdbnet.settings import Settings

H200 = 132  # multiprocessors


def stage_calls(batch: int, crop: int) -> list[tuple[int, int, int, int, int]]:
    """(B, G, channels per group, d_state, L) of the default network's scan call per stage."""
    m = Settings().model
    return [(batch, 4, max(1, int(m.ssm_expand * dim)), m.d_state, (crop // 4 >> i) ** 2)
            for i, dim in enumerate(m.mamba_dims)]


def test_without_a_card_the_plan_is_the_interpreters():
    """sms=0 (CPU, the interpreter): 16-channel programs, L in one chunk, as before chunks existed."""
    p = plan(*stage_calls(4, 256)[0], sms=0)
    assert (p.block_d, p.n_chunks, p.grid, p.programs) == (16, 1, (16, 2, 1), 32)


def test_stage_one_fills_a_large_card():
    before = plan(*stage_calls(4, 256)[0], sms=0).programs
    p = plan(*stage_calls(4, 256)[0], sms=H200)
    assert before == 32 and p.programs >= PROGRAMS_PER_SM * H200
    assert (p.block_d, p.chunk, p.n_chunks) == (4, 26, 5)


@pytest.mark.parametrize("batch", [4, 16])
def test_every_stage_gets_at_least_two_programs_per_multiprocessor(batch):
    for call in stage_calls(batch, 256):
        assert plan(*call, sms=H200).programs >= 2 * H200, call


def test_a_whole_4096_window_in_one_call():
    """Batch 1, L = 1024**2 at stage 1: channels alone give 32 programs; chunks give the rest."""
    b, g, dg, n, l = stage_calls(1, 4096)[0]  # noqa: E741
    assert l == 1024**2
    p = plan(b, g, dg, n, l, sms=H200)
    assert b * g * p.n_dblk == 32 and p.programs >= PROGRAMS_PER_SM * H200


@pytest.mark.parametrize("n", [1, 3, 16, 64])
@pytest.mark.parametrize("l", [1, 31, 33, 4096, 100_000])
@pytest.mark.parametrize("sms", [0, 16, 132])
def test_chunks_cover_l_once_and_blocks_stay_in_bounds(n, l, sms):  # noqa: E741
    p = plan(2, 4, 48, n, l, sms)
    assert (p.n_chunks - 1) * p.chunk < p.n_blocks <= p.n_chunks * p.chunk
    assert p.n_chunks == 1 or p.chunk >= MIN_CHUNK_BLOCKS
    assert p.block_d & (p.block_d - 1) == 0 and 1 <= p.block_d <= MAX_BLOCK_D
    assert p.n_dblk * p.block_d >= 48 > (p.n_dblk - 1) * p.block_d
    assert p.block_d * p.n_pad * 32 >= min(128, 16 * p.n_pad * 32)  # no tile under one element per thread


def test_a_small_card_keeps_larger_channel_blocks_and_no_chunks():
    p = plan(*stage_calls(4, 256)[0], sms=16)  # a laptop card
    assert (p.block_d, p.n_chunks, p.programs) == (8, 1, 64)


def test_the_largest_tiles_get_eight_warps_in_the_backward():
    """16 channels x d_state 4 x 32 steps (or 4 x 16 x 32): 2048 elements per tile, which spill at
    4 warps in the backward; smaller tiles keep 4."""
    assert plan(4, 4, 32, 4, 4096, 0).bwd_warps == plan(4, 4, 32, 16, 4096, 0).bwd_warps == 8
    assert plan(4, 4, 32, 1, 4096, 0).bwd_warps == plan(4, 4, 32, 16, 4096, 132).bwd_warps == 4
