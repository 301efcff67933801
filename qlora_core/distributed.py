"""Training on several processes (one per GPU) with torchrun: FSDP2 (default) or DDP, and the same code on the CPU.

    torchrun --nproc-per-node 4 -m qlora_core train --model ... --data ... --output ...   # FSDP2
    qlora train --nproc 4 --parallel ddp ...                                              # launches torchrun

`World` is this process's place in the job (rank, size, device) read from torchrun's environment; the process
group is NCCL on GPUs and gloo on the CPU. `wrap` turns the loss module (train_loop.LossModule: the Llama plus
batch_loss) into what each micro-batch calls:
- fsdp: `fully_shard` per decoder block, then the embedding (untied) and the root (final norm, lm_head). Every
  parameter of a block is sharded on dim 0 across ranks: the frozen NF4 weights (made flat Parameters of
  bytes first, flat_quant.py), norms, LoRA A and B, so their gradients and PagedAdamW's state are 1/N per rank
  too.
  Blocks are gathered for their forward and again for their backward (inside the gradient-checkpoint recompute).
  The root is the loss module, so the lm_head weight that batch_loss reads directly is gathered by the root's
  forward hook; FSDP keeps the root unsharded from forward to the end of backward.
- ddp: DistributedDataParallel over the loss module: every rank holds the whole model and averages LoRA grads.
Both average gradients over ranks, so train_loop.py scales each rank's loss by the number of ranks.

Every collective is joined by every rank, or the job hangs: the loop runs the same number of micro-batches and
eval batches on every rank (eval pads a rank's last share with an all-ignored dummy batch) and never skips a
backward (a non-finite loss is still backpropagated, then every rank skips the step together).
"""
from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import json
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import increment_version
from torch.nn.parallel import DistributedDataParallel as DDP

from .durable import atomic_write_text
from .errors import UsageError, one_line
from .flat_quant import flatten_quantized
from .lora import lora_modules

PARALLEL_MODES = ("fsdp", "ddp")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job. One process: rank 0 of 1, parallel "none"."""
    rank: int = 0  # global rank (0 prints, writes metrics, checkpoints and adapters)
    size: int = 1  # number of processes
    device: torch.device = torch.device("cpu")  # this rank's device (cuda:LOCAL_RANK under torchrun)
    parallel: str = "none"  # fsdp, ddp, or none (one process)
    owns_group: bool = False  # this World created the process group (and destroys it in close())

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over ranks, in fp64 (identity on one process)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        """Largest `value` over ranks."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this World created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """True inside a torchrun worker of a job with more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str) -> torch.device:
    """The device for `device` ("auto", "cpu", "cuda", "cuda:1", ...): under torchrun "auto"/"cuda" mean this
    rank's GPU, cuda:LOCAL_RANK; "auto" is the CPU when CUDA is absent."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local)
    return torch.device(device)


class DeviceError(UsageError, ValueError):
    """A device this machine does not have (cuda without a GPU, cuda:3 on a two-GPU host) or a misspelt one."""


def check_device(device: str | None) -> None:
    """DeviceError unless `device` (None or "auto": the default) names a device this process can use; called
    before any model loads, where torch would fail with an AssertionError deep inside the load."""
    if device in (None, "auto"):
        return
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"device {device!r} is not a device name ({e})") from None
    if dev.type != "cuda":
        return
    n = torch.cuda.device_count()  # 0 when torch has no CUDA or sees no GPU
    if n == 0:
        raise DeviceError(f"device {device!r}: no CUDA GPU is available here; use --device cpu")
    if dev.index is not None and dev.index >= n:
        raise DeviceError(f"device {device!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")


def init_world(device: str, parallel: str) -> World:
    """This process's World: one process unless torchrun started several (WORLD_SIZE > 1), in which case the
    process group is joined (created here unless the caller already did: NCCL on CUDA, gloo on the CPU)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    dev = local_device(device)
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return World(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.get_world_size() == 1:
        return World(device=dev, owns_group=owns)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=dev, parallel=parallel, owns_group=owns)


# -- wrapping ------------------------------------------------------------------------------------------------------
def wrap(loss_module: nn.Module, world: World) -> nn.Module:
    """What each micro-batch calls: `loss_module` as is on one process, DDP- or FSDP2-wrapped on several.

    loss_module.model must be a Llama-shaped model (model.model.layers, model.model.embed_tokens, lm_head).
    """
    if world.size == 1:
        return loss_module
    if world.parallel == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        # no buffers to broadcast (the rotary table is recomputed per forward); all LoRA params are used each step
        return DDP(loss_module, device_ids=ids, broadcast_buffers=False)
    return shard_fsdp(loss_module, world)


def shard_fsdp(loss_module: nn.Module, world: World) -> nn.Module:
    """fully_shard per decoder block, the embedding (when not tied to lm_head) and the root; returns loss_module
    (its class is now an FSDPModule). QuantLinear weights become flat Parameters of bytes first (flat_quant.py)."""
    mesh = fsdp_mesh(world)
    for layer in loss_module.model.model.layers:
        shard_block(layer, mesh)
    return shard_root(loss_module, mesh)


def fsdp_mesh(world: World):
    """The 1-D device mesh of all ranks that FSDP shards over."""
    from torch.distributed.device_mesh import init_device_mesh  # deferred: 0.9 s import, only for several processes
    return init_device_mesh(world.device.type, (world.size,))


def shard_block(block: nn.Module, mesh) -> nn.Module:
    """One decoder block: its 4-bit weights made flat (flat_quant.py), then fully_shard; this rank keeps 1/N of
    the block from here on (a model built block by block never holds the whole of it)."""
    from torch.distributed.fsdp import fully_shard  # deferred: 0.9 s import, only for several processes

    flatten_quantized(block)
    fully_shard(block, mesh=mesh)
    block.register_forward_pre_hook(_mark_gathered)  # runs after FSDP's own hook (prepended): params are whole
    return block


def _mark_gathered(module: nn.Module, args) -> None:
    """FSDP refills a block's unsharded parameters in place without bumping their version counters; bump those of
    the trainable ones, so caches keyed on `_version` (ops/nf4_linear.py's compute-dtype copies of A and B) see the
    values the optimizer wrote. Nothing is saved for backward yet at this point of the block's forward."""
    increment_version([p for p in module.parameters() if p.requires_grad])


def shard_root(loss_module: nn.Module, mesh) -> nn.Module:
    """After every block: the embedding (its own unit when untied: frozen, gathered for its forward only), then the
    root, the loss module (final norm and lm_head, kept unsharded by FSDP from forward to backward's end)."""
    from torch.distributed.fsdp import fully_shard  # deferred: 0.9 s import, only for several processes
    model = loss_module.model
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        fully_shard(model.model.embed_tokens, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    return loss_module


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool):
    """Inside: backward reduces gradients across ranks only if `enabled` (the last micro-batch of a step); the
    others accumulate locally (DDP no_sync, FSDP set_requires_gradient_sync(False))."""
    from torch.distributed.fsdp import FSDPModule  # deferred: 0.9 s import, only for several processes
    if isinstance(module, DDP) and not enabled:
        with module.no_sync():
            yield
        return
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
    yield


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), a plain tensor as is."""
    from torch.distributed.tensor import DTensor  # deferred: 0.9 s import, only for several processes
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params: list, max_norm: float) -> float:
    """Global L2 norm of the gradients of `params` (over every rank's shards), clipped to max_norm if > 0.

    The same two calls as torch.nn.utils.clip_grad_norm_ (get_total_norm, clip_grads_with_norm_); under FSDP
    the norm of the sharded gradients is a DTensor, made whole (one all-reduce) as torchtitan does.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = full(torch.nn.utils.get_total_norm(grads))
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def gather_lora(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (lora_A, lora_B), whole and on the CPU: what save_adapter writes. A collective under FSDP."""
    return {name: (full(m.lora_A).detach().cpu(), full(m.lora_B).detach().cpu())
            for name, m in lora_modules(model).items()}


# -- data ----------------------------------------------------------------------------------------------------------
def split_rows(rows: list, world: World) -> list:
    """This rank's contiguous share of a step's rows (len(rows) must divide by world.size)."""
    k = len(rows) // world.size
    return rows[world.rank * k:(world.rank + 1) * k]


# -- launching -----------------------------------------------------------------------------------------------------
def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m qlora_core <argv>` in `nproc` processes through torchrun's agent (`torch.distributed.run`, one
    node, run in this process); returns its exit code: 0, or 1 when the run failed.

    When any process fails (an exception, a kill), the agent stops the others and its summary is printed; then one
    `error: ...` line of our own names each failed rank and how it ended (exit code or signal), taken from the
    agent's result, not from its printout, and says that --resume continues: checkpoints are written whole or not
    at all. If the agent itself fails, that line names its exception instead.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "qlora_core", *argv]))
        return 0
    except ChildFailedError as e:
        print(e, file=sys.stderr)  # torchrun's summary: the failed ranks, a raising rank's traceback
        # first observed first (the agent's order; it stops the others with SIGTERM, so those come last)
        order = sorted(e.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp))
        how = ", ".join(f"rank {r} {_ended(f.exitcode)}" for r, f in order)
    except Exception as e:  # noqa: BLE001  (the agent itself failed; it stops the processes it started)
        how = f"torchrun's agent stopped with {type(e).__name__}: {one_line(e)}"
    print(f"error: {nproc}-process run failed: {how}. Checkpoints are whole: rerun with --resume to continue.",
          file=sys.stderr)
    return 1


def _ended(exitcode: int) -> str:
    """How a worker ended, from its exit code (negative: the signal that killed it)."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-exitcode} ({name})"
    return f"exited with code {exitcode}"


def record(fn):
    """`fn` wrapped as torch's elastic `record` wraps a torchrun worker: an exception is written to the agent's
    error file (TORCHELASTIC_ERROR_FILE, torch's JSON layout) and raised again. Unlike torch's, the file is written
    whole or not at all (temporary file, rename): the agent reads it once the worker has exited, and a worker it
    stops (SIGTERM, after another rank failed) in the middle of writing must not leave half a JSON document, which
    the agent fails to parse (it then crashes instead of reporting the failed ranks)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        faulthandler.enable(all_threads=True)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            path = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if path:
                info = {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}
                atomic_write_text(path, json.dumps({"message": {"message": f"{type(e).__name__}: {e}",
                                                                "extraInfo": info}}))
            raise
    return wrapper
