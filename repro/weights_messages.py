"""load_weights' new messages for a file of a directory's model, and its catch-all for OSError.

    PYTHONPATH=src /work/main/.venv/bin/python repro/weights_messages.py
"""
import json
import tempfile
from pathlib import Path

from halkspeech.errors import HalkSpeechError
from halkspeech.model.weights import load_weights


def show(label: str, path: Path) -> None:
    try:
        load_weights(path)
    except HalkSpeechError as exc:
        print(f"{label}:\n    {type(exc).__name__}: {exc}")


root = Path(tempfile.mkdtemp())
# 1. an HF checkpoint copied without its config.json: the advice names the wrong cause
bare = root / "no-config"
bare.mkdir()
(bare / "model.safetensors").write_bytes(b"\0" * 16)
show("model.safetensors, no config.json beside it", bare / "model.safetensors")
# 2. an HF hub snapshot holds both model.safetensors and pytorch_model.bin (openai/whisper-*): the .bin is refused
#    and told to be put in "a directory that holds it under that name", which this one already is
both = root / "whisper-tiny"
both.mkdir()
(both / "config.json").write_text(json.dumps({"model_type": "whisper"}))
(both / "model.safetensors").write_bytes(b"\0" * 16)
(both / "pytorch_model.bin").write_bytes(b"\0" * 16)
show("pytorch_model.bin beside model.safetensors", both / "pytorch_model.bin")
# 3. a read that fails (EACCES; EIO on a bad disk): "corrupt or not a Whisper model", and for a cached model the
#    registry adds "run `halkspeech models pull` to fetch it again". Root reads any file, so the failure is
#    injected where the file is opened.
import halkspeech.model.ct2 as ct2  # noqa: E402

cached = Path.home() / ".cache/halkspeech/models/tiny.en"


def denied(path: Path):
    raise PermissionError(13, "Permission denied", str(path))


ct2.map_file = denied
show("tiny.en's model.bin unreadable (PermissionError)", cached)
