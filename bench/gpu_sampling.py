"""The logit policies with the timestamp rules on the GPU, eager and captured in a CUDA graph, against the CPU
on random histories (tests/engine/test_sampling.py holds the CPU against openai-whisper's filters).

  PYTHONPATH=src python bench/gpu_sampling.py      # prints {"trials": 30, "mismatches": 0} when they agree
"""

import json
import random
import sys
import types
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parents[1] / "tests" / "engine"), str(Path(__file__).parents[1] / "tests")]
try:
    import whisper.decoding  # noqa: F401 - the test module's own reference; not needed here
except ImportError:  # the GPU machines have no openai-whisper: stand-ins for the names it imports
    stubs = {name: types.ModuleType(name) for name in ("whisper", "whisper.decoding", "whisper.tokenizer")}
    for name in ("ApplyTimestampRules", "SuppressBlank", "SuppressTokens"):
        setattr(stubs["whisper.decoding"], name, None)
    stubs["whisper.tokenizer"].get_tokenizer = None  # type: ignore[attr-defined]
    sys.modules.update(stubs)
from test_sampling import VOCAB, _histories, _state  # noqa: E402

from halkspeech.engine.sampling import Sampler, TokenIds  # noqa: E402
from halkspeech.model.tokenizer import Tokenizer  # noqa: E402

tok = Tokenizer(multilingual=True, num_languages=99)
prompt = list(tok.sot_sequence("en", "transcribe"))
ids = TokenIds.from_tokenizer(tok, VOCAB)
cpu, gpu = Sampler(ids, torch.device("cpu")), Sampler(ids, torch.device("cuda"))
rng, bad = random.Random(0), 0
for trial in range(30):
    h = _histories(tok, 64, rng)
    st = _state(tok, prompt, h, max_initial=50)
    st.ts_rules[::3] = False
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(trial)) * 3
    a = logits.clone()
    cpu.filter(a, st, timestamps=True)
    gst = type(st)(*(t.cuda() for t in st.tensors()))
    g = logits.cuda()
    graph_in = g.clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gpu.filter(graph_in.clone(), gst, timestamps=True)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        gpu.filter(graph_in, gst, timestamps=True)
    graph_in.copy_(g)
    graph.replay()
    torch.cuda.synchronize()
    eager = g.clone()
    gpu.filter(eager, gst, timestamps=True)
    for out in (eager, graph_in):
        same = torch.equal(torch.isinf(out.cpu()), torch.isinf(a)) and torch.allclose(
            out.cpu()[~torch.isinf(a)], a[~torch.isinf(a)]
        )
        bad += not same
print(json.dumps({"trials": 30, "mismatches": bad}))
