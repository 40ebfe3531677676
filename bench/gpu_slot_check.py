"""The slot-past-the-context case on the GPU (tests/engine/test_engine.py's, on real tiny.en in fp16):
staggered 44 s transcriptions forced to 224 tokens, then one alone; no failure, the same text.

  PYTHONPATH=src python bench/gpu_slot_check.py DIR OUT.json [cuda|cpu] [DELAYS]

DIR holds tiny.en.pt (an OpenAI checkpoint) and jfk.npy (tests/data/jfk.flac as 16 kHz int16 samples: the
device machine has no PyAV); DELAYS are the start times in seconds, comma-separated (default: 8 within 35 ms,
which on a GPU overlap; on a CPU use 0,1.5,3)."""

import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from halkspeech.config import EngineSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.weights import load_weights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

work, out = Path(sys.argv[1]), Path(sys.argv[2])
jfk = np.load(work / "jfk.npy").astype(np.float32) / 32767
audio = np.concatenate([jfk] * 4)
model = start_engine(
    load_weights(work / "tiny.en.pt"), EngineSettings(device=sys.argv[3] if len(sys.argv) > 3 else "cuda")
)
DELAYS = [
    float(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "0,0.005,0.01,0.015,0.02,0.025,0.03,0.035").split(",")
]
options = TranscribeOptions(force_decode_tokens=224, without_timestamps=True)


async def staggered(delay: float):
    await asyncio.sleep(delay)
    return await Transcriber(model).transcribe(audio, options)


async def main():
    return await asyncio.gather(*(staggered(d) for d in DELAYS))


try:
    failed = model.engine.stats.failed
    together = asyncio.run(main())
    alone = asyncio.run(Transcriber(model).transcribe(audio, options))
    texts = [[s.text for s in t.segments] for t in together]
    result = {
        "failed_before": failed,
        "failed_after": model.engine.stats.failed,
        "segments": [len(t.segments) for t in together],
        "tokens": [[len(s.tokens) for s in t.segments] for t in together],
        "together_equal_each_other": all(x == texts[0] for x in texts),
        "together_equal_alone": [x == [s.text for s in alone.segments] for x in texts],
        "alive": model.engine.alive,
        "queue_depth": model.engine.queue_depth,
        "alone_first_80_chars": [s.text[:80] for s in alone.segments],
    }
finally:
    model.close()
print(json.dumps(result, indent=1))
out.write_text(json.dumps(result, indent=1))
