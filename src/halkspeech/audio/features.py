"""Log-mel features, numerically the same as openai-whisper's `whisper.audio.log_mel_spectrogram`.

Everything runs on the device of the input (or `device`), so the engine computes log-mel on the GPU.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from halkspeech.model.dims import HOP_LENGTH, N_FFT, N_SAMPLES, SAMPLE_RATE

N_FREQS = N_FFT // 2 + 1  # 201 STFT bins

# Slaney's mel scale (librosa.filters.mel with htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mels at 1 kHz
_LOG_STEP = np.log(6.4) / 27.0  # 27 mels per factor 6.4 above 1 kHz


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, hz / _F_SP)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log_part = _MIN_LOG_HZ * np.exp(_LOG_STEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, mel * _F_SP)


def _slaney_filterbank(n_mels: int) -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels) as float32 [n_mels, N_FREQS]."""
    fft_hz = np.fft.rfftfreq(N_FFT, d=1.0 / SAMPLE_RATE)  # [N_FREQS]
    edges_hz = _mel_to_hz(np.linspace(0.0, _hz_to_mel(np.array(SAMPLE_RATE / 2)), n_mels + 2))  # [n_mels + 2]
    widths = np.diff(edges_hz)  # [n_mels + 1]
    ramps = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, N_FREQS]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # triangles: [n_mels, N_FREQS]
    # Slaney normalisation: each triangle has unit area in Hz, so band energies do not grow with bandwidth.
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)


@cache
def _cached_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_slaney_filterbank(n_mels)).to(device)


def mel_filters(n_mels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Slaney mel filterbank [n_mels, N_FFT // 2 + 1] on `device`, computed once per (n_mels, device)."""
    if n_mels not in (80, 128):
        raise ValueError(f"n_mels must be 80 or 128, got {n_mels}")
    return _cached_filters(n_mels, torch.device("cpu" if device is None else device))


@cache
def _hann_window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def _log10_mel(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Unnormalised log10 mel power: [..., T] float32 -> [..., n_mels, T // HOP_LENGTH]."""
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=_hann_window(audio.device), return_complex=True)
    power = stft[..., :-1].abs() ** 2  # [..., N_FREQS, frames]; the last frame is dropped, as in Whisper
    mel = mel_filters(n_mels, audio.device) @ power  # [..., n_mels, frames]
    return torch.clamp(mel, min=1e-10).log10()


def log_mel_spectrogram(
    audio: torch.Tensor | np.ndarray,
    n_mels: int = 80,
    padding: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Whisper's log-mel of 16 kHz audio [T] -> [n_mels, T // HOP_LENGTH], computed on `device` if given."""
    tensor = torch.from_numpy(audio) if isinstance(audio, np.ndarray) else audio
    tensor = tensor.to(device=device, dtype=torch.float32)
    if padding > 0:
        tensor = F.pad(tensor, (0, padding))
    log_spec = _log10_mel(tensor, n_mels)
    # Dynamic range of 80 dB below the loudest bin, then roughly [-1, 1].
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_windows(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Batched log-mel of 30 s windows [B, N_SAMPLES] -> [B, n_mels, N_FRAMES], each row normalised alone."""
    if audio.ndim != 2:
        raise ValueError(f"audio must be [B, samples], got shape {tuple(audio.shape)}")
    log_spec = _log10_mel(audio.to(torch.float32), n_mels)  # [B, n_mels, N_FRAMES]: one STFT for the batch
    # Per-row ceiling: a quiet window is not crushed by a loud neighbour (as faster-whisper batches).
    ceiling = log_spec.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    log_spec = torch.maximum(log_spec, ceiling - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim(array: torch.Tensor, length: int = N_SAMPLES, *, axis: int = -1) -> torch.Tensor:
    """Zero-pad or cut `array` along `axis` to `length` (a view when it only cuts)."""
    size = array.shape[axis]
    if size > length:
        return array.narrow(axis, 0, length)
    if size < length:
        pad = [0, 0] * array.ndim  # F.pad lists (left, right) pairs from the last axis backwards
        pad[2 * (array.ndim - 1 - axis % array.ndim) + 1] = length - size
        return F.pad(array, pad)
    return array
