"""Sequential mode's word-timing passes (frames None: no alignment graph can take them) are cut into chunks of
align_graph_rows (4) instead of max_jobs (16) once alignment graphs are on: 4x the eager passes (~150 launches
each for turbo, ~900 for large-v3) for 16 finished windows. CPU stand-in: a Runner built with
alignment_graph_rows=4 as the CUDA factory builds it; counts eager decoder.align calls.

    PYTHONPATH=src /work/main/.venv/bin/python repro/align_chunking.py
"""
from pathlib import Path

import torch

from halkspeech.engine.batch import AlignJob
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import load_weights
from halkspeech.model.whisper import Whisper

w = load_weights(Path.home() / ".cache/halkspeech/models/tiny.en")
model = Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=torch.float32, device="cpu")
tok = Tokenizer.for_model(w.dims)
ids = TokenIds.from_tokenizer(tok, w.dims.n_vocab)
prompt, _ = tok.decoder_prompt("en", "transcribe", timestamps=False)
jobs = [AlignJob(i, tuple(prompt), (400 + i, 401, 402), None) for i in range(16)]  # sequential mode: frames None

for rows in (0, 4):
    runner = Runner(model, ids, slots=16, cuda_graphs=False, alignment_heads=w.alignment_heads,
                    alignment_graph_rows=rows, alignment_prompt_len=len(prompt))
    calls = []
    align = model.decoder.align
    model.decoder.align = lambda *a, **k: calls.append(a[0].shape[0]) or align(*a, **k)
    done = runner.align_async(jobs)
    model.decoder.align = align
    print(f"alignment_graph_rows={rows}: {len(done.builders)} chunks, eager decoder passes of {calls} windows")
