"""One process of the gloo jobs that tests/test_distributed.py starts with torchrun: runs the training jobs listed in
a JSON file, one after the other, each with optional test hooks, and writes what the test compares.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_worker.py jobs.json [nccl]

A job: {"config": TrainConfig.to_dict(), "grads": bool, "quant_state": bool, "nan_calls": [rank, [calls]] or
null, "stop_call": int or null, "masks": bool}. Per job and rank it writes <output>/rank<R>.json (losses, evals,
stopped, packed bytes; with "masks" the dropout masks drawn, see MaskLog); rank 0 also writes grads-step1.pt (whole LoRA gradients of step 1) and quant_state.pt (the 4-bit weights'
state dict, gathered) when asked. A job {"kind": "fsdp_check", "config": ...} compares one micro-batch's loss and
gradients before and after distributed.shard_fsdp (fsdp_check.pt). gloo, or NCCL with "nccl" (one GPU per rank).
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qlora_core.train_loop as T  # noqa: E402
from qlora_core.train_config import TrainConfig, resolve_device  # noqa: E402
from qlora_core import distributed  # noqa: E402
from qlora_core.flat_quant import FlatQuantLinear  # noqa: E402
import qlora_core.ops.nf4_linear as NL  # noqa: E402


class MaskLog:
    """Records every LoRA dropout mask the grouped path draws (ops.nf4_linear.dropout_masks, forward and its
    backward regeneration) as [step, micro-batch, sha1 of the masks], step and micro-batch read from the
    train_loop.dropout_seed call that preceded it. `with MaskLog() as log:` patches both; log.rows after."""

    def __init__(self):
        self.rows, self.at = [], [None, None]

    def __enter__(self):
        self.real_seed, self.real_masks = T.dropout_seed, NL.dropout_masks

        def seed(s, step, rank, micro):
            self.at = [step, micro]
            return self.real_seed(s, step, rank, micro)

        def masks(*a, **k):
            out = self.real_masks(*a, **k)
            h = hashlib.sha1()
            for mk in out:
                if mk is not None:
                    h.update(mk.cpu().numpy().tobytes())
            self.rows.append(self.at + [h.hexdigest()])
            return out

        T.dropout_seed, NL.dropout_masks = seed, masks
        return self

    def __exit__(self, *exc):
        T.dropout_seed, NL.dropout_masks = self.real_seed, self.real_masks


class Stop(Exception):
    """Raised on every rank at the same batch_loss call: a run interrupted after its last checkpoint."""


def _hooks(job: dict, rank: int):
    """Patch train.py for this job; returns the undo function."""
    real_loss, real_fb = T.batch_loss, T.forward_backward
    calls = {"n": 0}
    nan = job.get("nan_calls")

    def loss(*a, **k):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if job.get("stop_call") == calls["n"]:
                raise Stop
        s, n = real_loss(*a, **k)
        if nan and rank == nan[0] and torch.is_grad_enabled() and calls["n"] in nan[1]:
            s = s * float("nan")
        return s, n

    def forward_backward(run, batch):
        out = real_fb(run, batch)
        if job.get("grads") and run.step == 0:
            grads = {n: distributed.full(p.grad).detach().clone() for n, p in run.model.named_parameters()
                     if p.requires_grad}
            if rank == 0:
                torch.save(grads, Path(run.cfg.output) / "grads-step1.pt")
        return out

    T.batch_loss, T.forward_backward = loss, forward_backward

    def undo():
        T.batch_loss, T.forward_backward = real_loss, real_fb
    return undo


def run_job(job: dict, rank: int) -> None:
    """Train one job's config (or until its stop_call) and write this rank's record."""
    cfg = TrainConfig.from_dict(job["config"])
    out = Path(cfg.output)
    undo = _hooks(job, rank)
    rec, log = {}, MaskLog()
    try:
        with log:
            result = T.train(cfg)
        rec = {"losses": result.losses, "evals": result.evals, "stopped": result.stopped, "steps": result.steps}
        flats = [m for m in result.model.modules() if isinstance(m, FlatQuantLinear)]
        rec["packed_local"] = sum(m.packed_bytes().numel() for m in flats)
        rec["packed_total"] = sum(m.layout.nbytes for m in flats)
        if job.get("quant_state"):
            sd = result.model.state_dict()  # every rank: FlatQuantLinear gathers its shards
            if rank == 0:
                torch.save({k: v for k, v in sd.items() if ".base_layer.weight" in k}, out / "quant_state.pt")
    except Stop:
        rec = {"interrupted": True}
    finally:
        undo()
    if job.get("masks"):
        rec["masks"] = log.rows
    (out / f"rank{rank}.json").write_text(json.dumps(rec))


def fsdp_check(job: dict, rank: int) -> None:
    """The job's model, LoRA B randomized, one micro-batch (the same rows on every rank): loss and LoRA gradients
    unsharded, then again after distributed.shard_fsdp; rank 0 writes both to <output>/fsdp_check.pt."""
    cfg = TrainConfig.from_dict(job["config"])
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(cfg)
    torch.manual_seed(0)
    model, _ = T.load_model(cfg, device, dtype)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), device=device)

    def loss_and_grads(loss_module):
        with T._autocast(device, dtype):
            s, n = loss_module(ids, ids)
        s.backward()
        grads = {k: distributed.full(p.grad).detach().float().cpu().clone() for k, p in model.named_parameters()
                 if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return float(s), grads

    ref = loss_and_grads(T.LossModule(model))
    world = distributed.World(rank=rank, size=dist.get_world_size(), device=device, parallel="fsdp")
    got = loss_and_grads(distributed.shard_fsdp(T.LossModule(model), world))
    if rank == 0:
        torch.save({"ref": ref, "fsdp": got}, out / "fsdp_check.pt")


def main() -> None:
    torch.set_num_threads(1)
    nccl = sys.argv[2:] == ["nccl"]
    if nccl:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if nccl else "gloo")
    rank = dist.get_rank()
    for job in json.loads(Path(sys.argv[1]).read_text()):
        (fsdp_check if job.get("kind") == "fsdp_check" else run_job)(job, rank)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
