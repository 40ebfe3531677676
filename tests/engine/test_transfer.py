"""Host↔device copies that do not wait for the device (engine/transfer.py). That the runner's admission and
step use them to wait once each is tested on a GPU in test_runner_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halkspeech.audio.features import log_mel_spectrogram
from halkspeech.engine.transfer import HostCopies, array_to_device, queue_to_host, to_device
from halkspeech.model.dims import N_SAMPLES


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


def test_an_array_to_a_cpu_is_the_array_itself() -> None:
    samples = np.linspace(-1, 1, 1000, dtype=np.float32)
    tensor = array_to_device(samples, torch.device("cpu"))
    assert tensor.dtype == torch.float32 and np.shares_memory(tensor.numpy(), samples)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_host_copies_from_the_gpu_are_pinned_and_equal() -> None:
    device = torch.device("cuda")
    values = to_device([[1, 2], [3, 4]], torch.long, device)
    assert values.device.type == "cuda"
    (host,) = HostCopies.queue(values * 10).wait()
    assert host.is_pinned() and host.tolist() == [[10, 20], [30, 40]]


@cuda
def test_an_array_reaches_the_gpu_through_pinned_memory_without_a_wait() -> None:
    """Sequential mode's log-mel is launched from the event loop on a GPU (transcription/sequential.py): its
    samples' copy and kernels must queue without a synchronising call (torch's sync debug mode raises on one,
    as on the pageable copy that `log_mel_spectrogram(samples, device=...)` makes), and give the same features."""
    device = torch.device("cuda")
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 7).astype(np.float32)
    expected = log_mel_spectrogram(samples, 80, padding=N_SAMPLES, device=device)  # also caches the filters
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued first: a call that waited for it would raise
        mel = log_mel_spectrogram(array_to_device(samples, device), 80, padding=N_SAMPLES)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    torch.testing.assert_close(mel, expected)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the check works: the pageable copy is a synchronising call
            log_mel_spectrogram(samples, 80, padding=N_SAMPLES, device=device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
