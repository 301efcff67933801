"""kernels/splitk.py: which workspace a split-K launch gets. Outside a CUDA-graph capture the cached pair of its
(device, stream), grown when too small; during a capture that stream's cached pair when big enough, else a fresh
zeroed pair that is never cached (graph-private memory must not reach eager calls). The capture state, the stream
and the device allocation are faked, so this runs on the CPU; tests/test_gpu_nf4_linear.py captures real graphs,
and the kernels' split-K results are checked against float64 by tests/test_nf4_linear_interpret.py and
tests/test_gpu_nf4_linear.py."""
import types

import torch

from qlora_core.kernels import splitk


def test_split_k_workspace_cached_per_stream_and_fresh_inside_a_capture(monkeypatch):
    dev = torch.device("cuda", 0)
    real_zeros = torch.zeros
    made = []

    def zeros(*shape, dtype=None, device=None):  # a CPU stand-in for the device allocation
        made.append((shape, dtype))
        return real_zeros(*shape, dtype=dtype)

    stream = types.SimpleNamespace(cuda_stream=7)
    capturing = [False]
    monkeypatch.setattr(splitk, "_WORKSPACE", {})
    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])

    ws, cnt = splitk.workspace(dev, 100, 10)
    assert ws.dtype == torch.float32 and cnt.dtype == torch.int32 and ws.numel() >= 100 and cnt.numel() >= 10
    assert splitk.workspace(dev, 100, 10)[0] is ws, "eager calls on one stream share one pair"
    assert splitk.workspace(dev, 50, 5)[0] is ws, "a smaller call fits the cached pair"
    assert len(made) == 2

    capturing[0] = True
    assert splitk.workspace(dev, 100, 10)[0] is ws, "a capture on a stream that ran eagerly uses its pair"
    ws2, cnt2 = splitk.workspace(dev, 300, 20)
    assert ws2.dtype == torch.float32 and cnt2.dtype == torch.int32
    assert ws2.numel() == 300 and cnt2.numel() == 20 and not ws2.any() and not cnt2.any()
    assert splitk._WORKSPACE[(str(dev), 7)][0] is ws, "a pair allocated inside the capture must not be cached"
    stream.cuda_stream = 8
    ws3, _ = splitk.workspace(dev, 100, 10)
    assert ws3 is not ws and (str(dev), 8) not in splitk._WORKSPACE, "another stream's pair is not shared"
    assert made[-1] == ((100 + 10,), torch.int32), "one zeroed buffer (one memset node) per captured call"

    capturing[0] = False
    ws4, _ = splitk.workspace(dev, 100, 10)
    assert ws4 is not ws3 and splitk._WORKSPACE[(str(dev), 8)][0] is ws4, "eager calls get their own cached pair"
    ws5, _ = splitk.workspace(dev, 300, 10)
    assert ws5.numel() >= 300 and splitk._WORKSPACE[(str(dev), 8)][0] is ws5, "the cached pair grows"
