"""kernels/splitk.py: when split-K may run. Inside a CUDA-graph capture only with a workspace allocated before
the capture (else the decode kernels fall back to SPLIT_K = 1), outside a capture always. The capture state and
the stream are faked, so this runs on the CPU; the kernels' split-K results are checked against float64 by
tests/test_linear_interpret.py (CPU) and tests/test_gpu_linear.py (GPU)."""
import types

import torch

from qlora_core.kernels import splitk


def test_split_k_needs_a_preallocated_workspace_during_capture(monkeypatch):
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(splitk, "_WORKSPACE", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert splitk.usable(dev, 100, 10)
    assert splitk.usable(torch.device("cpu"), 100, 10)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not splitk.usable(dev, 100, 10), "would allocate inside the capture"
    splitk._WORKSPACE[(str(dev), 7)] = (torch.zeros(100), torch.zeros(100, dtype=torch.int32))
    assert splitk.usable(dev, 100, 10)
    assert not splitk.usable(dev, 101, 10), "workspace too small: it would have to grow inside the capture"
    assert not splitk.usable(dev, 100, 101)
    splitk._WORKSPACE[(str(dev), 8)] = splitk._WORKSPACE.pop((str(dev), 7))
    assert not splitk.usable(dev, 100, 10), "another stream's workspace must not be shared"
