"""Sequence-chunked per-token work (long-context mode): f(x) run over row chunks of x, so that f's wide
intermediates exist for one chunk at a time, in forward, in a checkpoint's recompute and in backward.

Why: in a Llama block the SwiGLU MLP's intermediates dominate what one block's recompute holds per token: gate/up
(2I) and their product (I), 3 * 14336 bf16 = 84 KiB per token on an 8B against 60 KiB for everything attention
needs. With the blocks' inputs offloaded, that recompute is most of what stays on the GPU per token.

`chunked_rows(f, x, rows, params)` is an autograd Function (ChunkedRows): forward runs f on each chunk without
grad and saves only x; backward recomputes f on one chunk at a time with grad and takes its vector-Jacobian
product (that chunk's dx, and the grads of `params` summed over chunks). The same design as Arctic Long Sequence
Training's TiledMLP. Rejected: a plain loop over chunks under grad, which keeps every chunk's intermediates for
backward, i.e. the whole (rows, I) again. Cost: one more forward of f per step (under "offload" or "full" the MLP
then runs three times; at long context attention's T^2 term dominates the step, so this is a few percent).

f must be per row (row i of f(x) depends on row i of x only): the result equals f(x) up to the rounding of matmuls
over fewer rows. Attention is not per row and is never chunked, so per-document masks of packed rows are untouched.
RNG: f may draw random numbers (LoRA dropout, one seed per projection call). Backward replays the chunks in forward
order from the RNG state forward started with, so every chunk draws the masks it drew in forward. A chunk's masks
differ from the unchunked f's (they are drawn per chunk), so with dropout on, chunked and unchunked runs are equal
in distribution, not in value.
"""
from __future__ import annotations

import contextlib

import torch


def rng_state(device: torch.device) -> tuple:
    """(CPU RNG state, CUDA RNG state of `device` or None): what a recompute replays."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replay(rng: tuple, autocast: tuple, device: torch.device):
    """Run the body under the RNG state `rng` (rng_state) and autocast (enabled, dtype), leaving the caller's RNG
    as it was (the recompute must not shift the random numbers the rest of the step draws)."""
    with torch.random.fork_rng(devices=[device] if rng[1] is not None else []):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        with torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0]):
            yield


def autocast_state(device: torch.device) -> tuple:
    """(enabled, dtype) of autocast on `device` now."""
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _bounds(n: int, rows: int) -> list[tuple[int, int]]:
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def _run_chunks(f, x2: torch.Tensor, rows: int) -> torch.Tensor:
    """f over row chunks of x2 (N, K), written into one (N, K') output."""
    out = None
    for i, j in _bounds(x2.shape[0], rows):
        y = f(x2[i:j])
        if out is None:
            out = y.new_empty((x2.shape[0], *y.shape[1:]))
        out[i:j] = y
    return out


class ChunkedRows(torch.autograd.Function):
    """y = f(x) computed `rows` rows at a time; saves x only and recomputes each chunk in backward."""

    @staticmethod
    def forward(ctx, f, rows: int, x2: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """x2 (N, K) -> f(x2) (N, K'); params: the trainable tensors f uses (their grads are returned)."""
        # params on ctx, not save_for_backward: they are leaf parameters, and a checkpoint around this must not
        # treat them as activations to recompute
        ctx.f, ctx.rows, ctx.params = f, rows, params
        ctx.rng, ctx.autocast = rng_state(x2.device), autocast_state(x2.device)
        ctx.save_for_backward(x2)
        with torch.no_grad():
            return _run_chunks(f, x2, rows)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        """Per chunk: recompute f with grad, backpropagate its slice of dy; dx by slices, param grads summed."""
        (x2,) = ctx.saved_tensors
        params = ctx.params
        dx = torch.empty_like(x2) if ctx.needs_input_grad[2] else None
        dps = [None] * len(params)
        want = [i for i, p in enumerate(params) if ctx.needs_input_grad[3 + i]]
        with replay(ctx.rng, ctx.autocast, x2.device), torch.enable_grad():
            for i, j in _bounds(x2.shape[0], ctx.rows):
                xc = x2[i:j].detach().requires_grad_(dx is not None)
                y = ctx.f(xc)
                ins = ([xc] if dx is not None else []) + [params[k] for k in want]
                gs = torch.autograd.grad(y, ins, dy[i:j], allow_unused=True)
                if dx is not None:
                    dx[i:j], gs = gs[0], gs[1:]
                for k, g in zip(want, gs):
                    if g is not None:
                        dps[k] = g if dps[k] is None else dps[k] + g
        return (None, None, dx, *dps)


def chunked_rows(f, x: torch.Tensor, rows: int, params) -> torch.Tensor:
    """f(x) for a per-row f, run `rows` rows at a time: x (..., K) -> (..., K'). Under grad through ChunkedRows
    (only one chunk's intermediates live at once, also in backward); without grad a plain loop over chunks.
    params: the trainable tensors f reads (their grads flow through ChunkedRows, like any input's)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    params = [p for p in params if p.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        y = _run_chunks(f, x2, rows)
    else:
        y = ChunkedRows.apply(f, rows, x2, *params)
    return y.view(*lead, y.shape[-1])
