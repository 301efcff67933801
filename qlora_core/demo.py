"""`python -m qlora_core.demo`: quantize Llama-shaped weights and print error and storage per parameter.

Runs on whatever is there: the Triton kernels on a CUDA GPU, the PyTorch reference on the CPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import backend, dequantize, quantize


def main(argv=None) -> None:
    """Quantize a random Llama-like weight (--rows x --cols in --dtype) to nf4 and fp4, each with and without double
    quant, and print bits/param, mean |error|, mean relative error, SQNR (dB) and time (ms) per format.

    The time is one unwarmed quantize + dequantize (synchronized on CUDA), so the first row includes any kernel
    compile. Runs on CUDA when available, else the CPU reference; argv defaults to sys.argv[1:]. Prints only.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="output features of the demo weight")
    ap.add_argument("--cols", type=int, default=2048, help="input features of the demo weight")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    # a Llama-like weight: Gaussian, std 0.02, with a few outliers
    w = (torch.randn(args.rows, args.cols, device=device) * 0.02)
    w.view(-1)[:: 9973] *= 8
    w = w.to(dtype)
    print(f"weight {tuple(w.shape)} {args.dtype} on {device} (backend: {backend.choose(device)})")
    print(f"{'format':<14}{'bits/param':>11}{'mean|err|':>12}{'rel err':>10}{'SQNR dB':>9}{'time ms':>9}")
    ref = w.double()
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            t0 = time.perf_counter()
            q = quantize(w, quant_type, 64, dq)
            y = dequantize(q).double()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = 1e3 * (time.perf_counter() - t0)
            err = y - ref
            sqnr = 10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum()).item()
            rel = (err.abs() / (ref.abs() + 1e-8)).mean().item()
            name = quant_type + (" + DQ" if dq else "")
            print(f"{name:<14}{q.bits_per_parameter():>11.3f}{err.abs().mean().item():>12.2e}{rel:>10.3f}"
                  f"{sqnr:>9.2f}{ms:>9.1f}")
    print(f"(bf16 is 16 bits/param; the quantized weight is {16 / quantize(w).bits_per_parameter():.2f}x smaller)")


if __name__ == "__main__":
    main()
