"""Host↔device copies that do not wait for the device (engine/transfer.py). That the runner's admission and
step use them to wait once each is tested on a GPU in test_runner_cuda.py."""

from __future__ import annotations

import pytest
import torch

from halkspeech.engine.transfer import HostCopies, queue_to_host, to_device


def test_to_device_on_a_cpu_equals_torch_tensor() -> None:
    rows = [[1, 2, 3], [4, 5, 6]]
    made = to_device(rows, torch.long, torch.device("cpu"))
    assert made.dtype == torch.long and made.tolist() == rows
    assert to_device([0.5, 1.0], torch.float32, torch.device("cpu")).tolist() == [0.5, 1.0]


def test_host_copies_on_a_cpu_are_the_tensors_themselves() -> None:
    a, b = torch.arange(4), torch.ones(2, 3)
    copies = HostCopies.queue(a, b)
    assert copies.done is None
    got = copies.wait()
    assert got[0] is a and got[1] is b
    assert queue_to_host(None, a) == [None, a]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_host_copies_from_the_gpu_are_pinned_and_equal() -> None:
    device = torch.device("cuda")
    values = to_device([[1, 2], [3, 4]], torch.long, device)
    assert values.device.type == "cuda"
    (host,) = HostCopies.queue(values * 10).wait()
    assert host.is_pinned() and host.tolist() == [[10, 20], [30, 40]]
