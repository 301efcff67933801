"""Split-K in one launch: SPLIT_K programs compute fp32 partials of one output tile, the last to arrive adds them
in a fixed order and writes the tile.

Used by the decode kernels (gemv, gemv1 and gemv_mma in kernels/nf4_linear.py), where N alone gives too few
programs to keep an H100 busy. The usual alternative (a zeroed fp32 buffer, atomics, then a cast kernel) costs
two more launches, ~2-4 us in a CUDA graph, as much as the whole op at 4096x4096.

How: program k of a tile stores its partial into its own slot k of the workspace (slots are `slot` floats
apart), then (after a CTA barrier, so every thread's store is issued first) increments the tile's counter, whose
atomic has release/acquire semantics. The program that sees SPLIT_K - 1 reads the slots back through L2 (an
atomic add of 0: a coherent read), adds them in slot order 0, 1, ..., resets the counter, adds the bias and
stores y in its dtype. The sum order does not depend on which program arrives last, so results are bitwise
reproducible run to run (adding into one buffer in arrival order was not: seeded sampling diverged). Counters
are all-zero between calls; slots are overwritten before they are read, so they need no zeroing.
Reference: the same kernels with SPLIT_K = 1 (tests compare both with float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rne

_WORKSPACE: dict = {}


def workspace(device, n: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial-sum slots (>= n floats: SPLIT_K slots of the output's size) and all-zero int32 tile counters
    (>= tiles) for one split-K launch on the current stream.

    Outside a CUDA-graph capture: one cached pair per (device, stream) (calls on one stream run in order; another
    stream gets its own pair), allocated zeroed only when it must grow; the kernels leave the counters zeroed.
    During a capture: that stream's cached pair when it is big enough (it is all-zero between calls, and the graph
    keeps it so); otherwise a fresh zeroed pair allocated inside the capture: memory of the graph's private pool,
    zeroed by one memset node at every replay, and never cached (an eager call must not use memory that only the
    graph zeroes). Graphs are usually captured on a side stream that never ran the op eagerly (torch.cuda.graph
    does), so this is the common case; split-K used to fall back to one K split there, which made the M = 16
    kernel 2x slower at 4096x4096 in a graph on an H200 (40.2 us against 20.5, docs/benchmarks.md)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is not None and ws.numel() >= n and cnt.numel() >= tiles:
        return ws, cnt
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        buf = torch.zeros(n + tiles, dtype=torch.int32, device=device)  # one memset node: zero bits = 0.0f
        return buf[:n].view(torch.float32), buf[n:]
    size = max(n, ws.numel() if ws is not None else 0)
    ws = torch.zeros(size, dtype=torch.float32, device=device)
    cnt = torch.zeros(max(tiles, size), dtype=torch.int32, device=device)
    _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


@triton.jit
def k_blocks(pid_k, K, NB: tl.constexpr, SPLIT_K: tl.constexpr):
    """[b_lo, b_hi): the 64-column blocks of K that K split `pid_k` of SPLIT_K owns, whole steps of NB blocks."""
    KB = K // 64
    steps = tl.cdiv(tl.cdiv(KB, NB), SPLIT_K)
    b_lo = pid_k * steps * NB
    return b_lo, tl.minimum(KB, b_lo + steps * NB)


@triton.jit
def store(acc, bias, out_ptrs, ws_ptrs, mask, cnt_ptr, tile, pid_k, slot, SPLIT_K: tl.constexpr):
    """Write acc + bias (fp32, any shape; bias broadcastable or 0.0) to out_ptrs in their dtype: directly when
    SPLIT_K == 1, else through the workspace: ws_ptrs (acc's shape) address the tile in slot 0, slot k starts
    `slot` floats later; the last of the tile's programs sums the slots in order."""
    if SPLIT_K > 1:
        tl.store(ws_ptrs + pid_k * slot, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before this program is counted
        done = tl.atomic_add(cnt_ptr + tile, 1)
        if done == SPLIT_K - 1:
            tot = tl.zeros_like(acc)
            for k in tl.static_range(SPLIT_K):  # slot order, whoever arrived last: reproducible sums
                part = tl.atomic_add(ws_ptrs + k * slot, tl.zeros_like(acc), mask=mask)  # a coherent read (L2)
                tot += tl.where(mask, part, 0.0)  # masked lanes of an atomic return garbage
            tl.atomic_xchg(cnt_ptr + tile, 0)
            tl.store(out_ptrs, cast_rne(tot + bias, out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, cast_rne(acc + bias, out_ptrs.dtype.element_ty), mask=mask)
