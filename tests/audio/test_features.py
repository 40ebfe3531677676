"""Log-mel parity with openai-whisper (the reference implementation) on real recordings."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import TEST_DATA
from halkspeech.audio.decode import decode_audio
from halkspeech.audio.features import log_mel_spectrogram, log_mel_windows, mel_filters, pad_or_trim
from halkspeech.model.dims import N_FRAMES, N_SAMPLES

whisper_audio = pytest.importorskip("whisper.audio")

CLIPS = ["jfk.flac", "LJ001-0002.wav", "1089-134691-0000.flac", "test_de.wav"]


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    return {name: decode_audio(TEST_DATA / name) for name in CLIPS}


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_whisper_assets(n_mels: int) -> None:
    path = os.path.join(os.path.dirname(whisper_audio.__file__), "assets", "mel_filters.npz")
    with np.load(path) as assets:
        expected = assets[f"mel_{n_mels}"]
    filters = mel_filters(n_mels)
    assert filters.shape == (n_mels, 201) and filters.dtype == torch.float32
    np.testing.assert_allclose(filters.numpy(), expected, rtol=0, atol=1e-6)


def test_mel_filters_cached_per_device_and_checked() -> None:
    assert mel_filters(80) is mel_filters(80, "cpu")
    assert mel_filters(80) is not mel_filters(128)
    with pytest.raises(ValueError, match="80 or 128"):
        mel_filters(64)


@pytest.mark.parametrize("padding", [0, N_SAMPLES])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_whisper(clips: dict[str, np.ndarray], n_mels: int, padding: int) -> None:
    for name, audio in clips.items():
        expected = whisper_audio.log_mel_spectrogram(audio, n_mels=n_mels, padding=padding)
        ours = log_mel_spectrogram(audio, n_mels=n_mels, padding=padding)
        assert ours.shape == expected.shape == (n_mels, (audio.size + padding) // 160), name
        assert (ours - expected).abs().max().item() < 1e-4, name


def test_log_mel_accepts_tensors_float64_and_device(clips: dict[str, np.ndarray]) -> None:
    audio = clips["LJ001-0002.wav"]
    expected = log_mel_spectrogram(audio)
    torch.testing.assert_close(log_mel_spectrogram(torch.from_numpy(audio), device="cpu"), expected)
    torch.testing.assert_close(log_mel_spectrogram(audio.astype(np.float64)), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_log_mel_on_cuda_matches_cpu(clips: dict[str, np.ndarray]) -> None:
    audio = pad_or_trim(torch.from_numpy(clips["jfk.flac"]))
    on_gpu = log_mel_spectrogram(audio, n_mels=128, device="cuda")
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu() - log_mel_spectrogram(audio, n_mels=128)).abs().max().item() < 1e-4
    windows = log_mel_windows(torch.stack([audio, audio * 0.01]).cuda(), 128)
    assert (windows[1].cpu() - log_mel_spectrogram(audio * 0.01, n_mels=128)).abs().max().item() < 1e-4


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_windows_normalise_each_row_alone(clips: dict[str, np.ndarray], n_mels: int) -> None:
    # A loud, a very quiet (-40 dB) and a longer-than-30-s row: each must equal its own log-mel.
    loud = torch.from_numpy(clips["jfk.flac"])
    quiet = torch.from_numpy(clips["LJ001-0002.wav"]) * 0.01
    long = torch.cat([torch.from_numpy(a) for a in clips.values()] * 2)
    assert long.numel() > N_SAMPLES
    rows = [pad_or_trim(a) for a in (loud, quiet, long)]
    windows = log_mel_windows(torch.stack(rows), n_mels)
    assert windows.shape == (3, n_mels, N_FRAMES) and windows.dtype == torch.float32
    for i, row in enumerate(rows):
        assert (windows[i] - log_mel_spectrogram(row, n_mels)).abs().max().item() < 1e-5, i
    # Whisper's function on the stack floors all rows at the loudest one's max - 8, changing the quiet row.
    floored_together = log_mel_spectrogram(torch.stack(rows), n_mels)
    assert (floored_together[1] - windows[1]).abs().max().item() > 0.5


def test_log_mel_windows_rejects_1d() -> None:
    with pytest.raises(ValueError, match="B, samples"):
        log_mel_windows(torch.zeros(N_SAMPLES), 80)


@pytest.mark.parametrize(
    ("shape", "length", "axis"),
    [((5,), 8, -1), ((5,), 3, -1), ((3, 4), 6, 0), ((3, 4), 2, 0), ((3, 4), 5, 1)],
)
def test_pad_or_trim_matches_whisper(shape: tuple[int, ...], length: int, axis: int) -> None:
    array = torch.arange(float(np.prod(shape))).reshape(shape) + 1
    ours = pad_or_trim(array, length, axis=axis)
    assert ours.shape[axis] == length
    torch.testing.assert_close(ours, whisper_audio.pad_or_trim(array, length, axis=axis))


def test_pad_or_trim_default_is_30_s() -> None:
    assert pad_or_trim(torch.ones(100)).shape == (N_SAMPLES,)
    same = torch.ones(N_SAMPLES)
    assert pad_or_trim(same) is same
