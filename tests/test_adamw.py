"""The adamw op's Triton kernels (kernels/adamw.py, one tensor at a time) under TRITON_INTERPRET=1 against its PyTorch
references (qlora_core/ops/adamw.py: adamw8bit_ref, adamw32_ref), in a subprocess (the variable must be set before
triton is first imported). The custom ops adamw8bit_step / adamw32_step run under torch.compile in
tests/test_compile.py; PagedAdamW, which launches these kernels page by page, in tests/test_optim.py."""
from tests.helpers import run_interpreted

_INTERP = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process
import torch
from qlora_core.formats import dynamic_map
from qlora_core.kernels.adamw import adamw8bit, adamw32
from qlora_core.ops.adamw import BLOCKSIZE, adamw8bit_ref, adamw32_ref, adamw_coeffs

torch.manual_seed(0)
q1, q2 = dynamic_map(True), dynamic_map(False)
fails = []
# one-tensor kernel vs reference: fp32/fp16 bit-exact (numpy has no FMA); bf16 within one bf16 ulp because the
# interpreter casts fp32 -> bf16 by truncation, the GPU by round-to-nearest-even (checked on the device)
for n in (1000, 4097, 768):
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        nb = (n + 255) // 256
        p = (torch.randn(n) * 0.1).to(dt)
        A = [p.clone(), torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(nb),
             torch.zeros(nb)]
        B = [x.clone() for x in A]
        bf16_ok = True
        for t in range(1, 4):
            g = (torch.randn(n) * 0.01).to(dt)
            g[5] = float("nan")
            g[256:512] = 0.0
            k = adamw_coeffs(t, 1e-3, 0.9, 0.999, 1e-8, 0.01, 8)
            adamw8bit_ref(A[0], g, *A[1:], q1, q2, k)
            adamw8bit(B[0], g, *B[1:], q1, q2, k, BLOCKSIZE)
            if dt == torch.bfloat16:  # per step: two truncating casts -> at most 2 bf16 ulps; then re-sync p
                bf16_ok &= bool(((A[0].float() - B[0].float()).abs() <= A[0].float().abs() * 2 ** -6).all())
                B[0].copy_(A[0])
        same = [torch.equal(a, b) for a, b in zip(A, B)]
        if dt == torch.bfloat16:
            same[0] = bf16_ok
        if not all(same):
            fails.append(("8bit", n, str(dt), same))
        # 32-bit: one step at a time from the same state (B re-synced to A). p within 2 ulps of its dtype: in fp32
        # the decay multiply and the update's add round differently (torch's addcdiv may fuse; its CPU sqrt is not
        # correctly rounded, the kernel's sqrt_rn is); a 16-bit p can flip its final rounding, and bf16 is cast by
        # truncation in the interpreter. Bounds are ulps of each step's operands, not of its result (p and the
        # update, or m's two terms, may nearly cancel). A step is ~1e-3, 16 fp16 ulps of |p| ~ 0.1: a wrong update
        # cannot hide in these bounds.
        A = [p.clone(), torch.zeros(n), torch.zeros(n)]
        B = [x.clone() for x in A]
        ulps = 2
        for t in range(1, 4):
            g = (torch.randn(n) * 0.01).to(dt)
            k = adamw_coeffs(t, 1e-3, 0.9, 0.999, 1e-8, 0.01, 32)
            prev = [x.double().abs() for x in A]
            adamw32_ref(A[0], g, A[1], A[2], k)
            adamw32(B[0], g, B[1], B[2], k, BLOCKSIZE)
            g64 = g.double().abs()
            bounds = (ulps * torch.finfo(dt).eps * (prev[0] + A[0].double().abs()),
                      2 * 2.0 ** -23 * (prev[1] + g64), 2 * 2.0 ** -23 * (prev[2] + g64 * g64))
            for name, a, b, bound in zip(("p", "m", "v"), A, B, bounds):
                if not ((a.double() - b.double()).abs() <= bound).all():
                    fails.append(("32bit " + name, n, str(dt), t, (a.double() - b.double()).abs().max().item()))
            for a, b in zip(A, B):
                b.copy_(a)
print("FAILS", fails)
sys.exit(1 if fails else 0)
"""


def test_triton_kernels_interpreter_match_reference():
    run_interpreted(_INTERP)
