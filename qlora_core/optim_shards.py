"""PagedAdamW state across process counts: every rank's shard saved as is, loaded onto any number of ranks.

Under FSDP2 each rank's PagedAdamW holds the state of its own rows of every parameter (dim-0 shards, torch.chunk's
rule) and quantizes 8-bit state in 256-element blocks of those local rows. `gather_state` collects every rank's
state_dict with the rows it covers (rank 0 writes it). `load_state` gives a rank its own saved shard, bit for bit,
when its rows are unchanged; otherwise (another process count, or FSDP <-> DDP / one process) each parameter's
state is cut again for this rank's rows: fp32 moments and step counts move exactly, and so do 8-bit codes and
absmax wherever the new 256-element blocks are whole blocks of the saved shards (FSDP shards of LoRA matrices with
r and widths that are multiples of 256 / rows); other 8-bit blocks are re-quantized from the fp32 moments, within
one 8-bit code of the saved values.
One process and DDP (every rank holds the same whole state) save the plain PagedAdamW state_dict, the format of
single-process checkpoints, which loads onto any layout the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .formats import dynamic_map
from .ops.adamw import BLOCKSIZE as BLOCK  # PagedAdamW's 8-bit state block
from .ops.quant4 import dequantize_blockwise_ref, quantize_blockwise_ref

FORMAT = "qlora_core.sharded_paged_adamw/1"


def _params(opt) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


def row_range(p: torch.Tensor, rank: int, size: int) -> tuple[int, int]:
    """(first, end) rows of p's dim 0 on `rank`: all rows for a plain tensor, torch.chunk's share for a DTensor
    (FSDP2's dim-0 sharding: ceil(rows / size) per rank, the last ranks possibly shorter or empty)."""
    rows = p.shape[0] if p.dim() else 1
    to_local = getattr(p, "to_local", None)
    if to_local is None:
        return 0, rows
    chunk = -(-rows // size)
    first = min(rank * chunk, rows)
    end = min(first + chunk, rows)
    got = to_local().shape[0] if p.dim() else 1
    if got != end - first:
        raise RuntimeError(f"parameter of shape {tuple(p.shape)}: rank {rank} holds {got} rows, torch.chunk's rule "
                           f"gives {end - first}; FSDP's sharding changed")
    return first, end


def gather_state(opt, rank: int, size: int) -> dict | None:
    """The checkpoint form of `opt`'s state, on rank 0 (None elsewhere). A collective when parameters are sharded.

    Sharded: {"format", "shapes": global shapes, "ranks": [{"rows": [(first, end)] per param, "state": that
    rank's state_dict()}]}; otherwise the plain state_dict().
    """
    params = _params(opt)
    sd = opt.state_dict()
    if not any(hasattr(p, "to_local") for p in params):
        return sd if rank == 0 else None
    mine = {"rows": [row_range(p, rank, size) for p in params], "state": sd}
    parts = [None] * size if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    return {"format": FORMAT, "shapes": [tuple(p.shape) for p in params], "ranks": parts}


def load_state(opt, saved: dict, rank: int, size: int) -> None:
    """Load a gather_state() form (or a plain state_dict) into `opt`, whose parameters may be sharded differently.

    Exact when this rank's rows equal a saved shard's; else moments are rebuilt over all rows and re-cut (module
    docstring). ValueError when the parameter shapes differ from the saved ones.
    """
    params = _params(opt)
    mine = [row_range(p, rank, size) for p in params]
    if saved.get("format") == FORMAT:
        shapes, shards = [tuple(s) for s in saved["shapes"]], saved["ranks"]
    else:
        shapes = [tuple(p.shape) for p in params]
        shards = [{"rows": [(0, s[0] if s else 1) for s in shapes], "state": saved}]
    if shapes != [tuple(p.shape) for p in params]:
        raise ValueError(f"optimizer state is for parameter shapes {shapes[:3]}..., the model has "
                         f"{[tuple(p.shape) for p in params][:3]}...")
    for s in shards:
        if [tuple(r) for r in s["rows"]] == mine:
            opt.load_state_dict(s["state"])
            return
    state = {}
    for i, p in enumerate(params):
        entry = _recut(i, shapes[i], shards, mine[i])
        if entry is not None:
            state[i] = entry
    base = shards[0]["state"]
    opt.load_state_dict({"state": state, "param_groups": base["param_groups"], "optim_bits": base.get("optim_bits")})


def _moments(st: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) flat fp32 of one saved entry (8-bit codes dequantized)."""
    if "state1" in st:
        m = dequantize_blockwise_ref(st["state1"].reshape(-1), st["absmax1"], dynamic_map(True), BLOCK)
        v = dequantize_blockwise_ref(st["state2"].reshape(-1), st["absmax2"], dynamic_map(False), BLOCK)
        return m, v
    return st["exp_avg"].reshape(-1).float(), st["exp_avg_sq"].reshape(-1).float()


def _same_blocks(pieces: list, first: int, end: int) -> list | None:
    """The saved (entry, start, stop) pieces covering elements [first, end) when every 256-block of the new range
    is a whole block of one saved shard (typical FSDP shards of LoRA matrices); else None."""
    out = []
    for st, s0, s1 in pieces:
        lo, hi = max(first, s0), min(end, s1)
        if lo >= hi:
            continue
        if (lo - s0) % BLOCK or (lo - first) % BLOCK or (hi < end and (hi - first) % BLOCK):
            return None
        out.append((st, lo - s0, hi - s0))
    return out


def _recut(i: int, shape: tuple, shards: list, rows: tuple[int, int]) -> dict | None:
    """Parameter i's state for `rows`, rebuilt from every shard; None when no shard has stepped it or the rows are
    empty. 8-bit codes and absmax are copied where the blocks line up (re-quantizing a block whose largest moment
    is negative would shrink its absmax: the signed map ends at -0.993), else re-quantized from fp32."""
    numel = 1
    for s in shape:
        numel *= s
    per_row = numel // (shape[0] if shape else 1)
    pieces = []
    for s in shards:
        st = s["state"]["state"].get(i, s["state"]["state"].get(str(i)))
        if st is not None:
            pieces.append((st, s["rows"][i][0] * per_row, s["rows"][i][1] * per_row))
    if not pieces or rows[1] <= rows[0]:
        return None
    first, end = rows[0] * per_row, rows[1] * per_row
    local_shape = ((rows[1] - rows[0]),) + tuple(shape[1:]) if shape else ()
    entry = {"step": pieces[0][0]["step"]}
    eight = "state1" in pieces[0][0]
    parts = _same_blocks(pieces, first, end) if eight else None
    if parts is not None:
        for name in ("state1", "state2"):
            entry[name] = torch.cat([st[name].reshape(-1)[lo:hi] for st, lo, hi in parts]).reshape(local_shape)
        for name in ("absmax1", "absmax2"):
            entry[name] = torch.cat([st[name][lo // BLOCK:-(-hi // BLOCK)] for st, lo, hi in parts])
        return entry
    m = torch.zeros(numel, dtype=torch.float32)
    v = torch.zeros(numel, dtype=torch.float32)
    for st, s0, s1 in pieces:
        m[s0:s1], v[s0:s1] = _moments(st)
    m, v = m[first:end], v[first:end]
    if not eight:
        entry.update(exp_avg=m.reshape(local_shape).clone(), exp_avg_sq=v.reshape(local_shape).clone())
        return entry
    c1, a1 = quantize_blockwise_ref(m, dynamic_map(True), BLOCK)
    c2, a2 = quantize_blockwise_ref(v, dynamic_map(False), BLOCK)
    entry.update(state1=c1.reshape(local_shape), state2=c2.reshape(local_shape), absmax1=a1, absmax2=a2)
    return entry
