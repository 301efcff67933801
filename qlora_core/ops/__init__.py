"""The ops: one file per op, each holding the op's public function, its PyTorch reference (the spec), its
autograd Function and its `torch.library` custom op with a fake, and the one dispatch decision between the
reference and the Triton launchers of `qlora_core.kernels.<op>` (which import nothing from this package).

| stem | library file | kernels | tests | benchmark |
|---|---|---|---|---|
| quant4 | ops/quant4.py | kernels/quant4.py | tests/test_quant4*.py, test_bnb_compat.py, test_gpu_quant4.py | benchmarks/bench_quant4.py |
| nf4_linear | ops/nf4_linear.py | kernels/nf4_linear.py, nf4_decode.py, splitk.py | tests/test_nf4_linear*.py, test_gpu_nf4_linear.py | benchmarks/bench_nf4_linear.py |
| adamw | ops/adamw.py | kernels/adamw.py | tests/test_adamw.py; PagedAdamW (optim.py): test_optim.py, test_gpu_optim.py | benchmarks/bench_adamw.py |
| rmsnorm | ops/rmsnorm.py | kernels/rmsnorm.py | tests/test_rmsnorm.py, test_gpu_rmsnorm.py | benchmarks/bench_rmsnorm.py |
| rope | ops/rope.py | kernels/rope.py | tests/test_rope.py, test_gpu_rope.py | benchmarks/bench_rope.py |
| swiglu | ops/swiglu.py | kernels/swiglu.py | tests/test_swiglu.py, test_gpu_swiglu.py | benchmarks/bench_swiglu.py |
| linear_ce | ops/linear_ce.py | kernels/linear_ce.py | tests/test_linear_ce.py, test_gpu_linear_ce.py | benchmarks/bench_linear_ce.py |
"""
