"""The persistent batch-1 decode step (model/step_kernel.py) on the GPU, in one call:

  A. correctness: 40 teacher-forced steps of one slot (random weights, fp16), the persistent kernel against
     the fused launches: logits' largest difference, argmax agreement, barriers given up on; the kernel's
     registers and spills
  B. step graph replay at batch 1 (inputs, layers, logits): fused launches against the persistent kernel
     and its variants (VARIANTS: prefetch, warps, tiles, cooperative launch)
  D. grid barriers alone (triton_step._sync), each way of polling: µs a barrier
  C. one 30 s window with 80 forced tokens through the whole engine (`bench engine` at batch 1), the
     persistent step off and on

Run: PYTHONPATH=src python bench/gpu_step.py OUT_DIR [sections, e.g. ABC] [models, e.g. large-v3,large-v3-turbo]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from gpu_explore import run_section
from halkspeech.bench.common import cuda_ms, device_info
from halkspeech.bench.engine_bench import EngineBenchConfig, run_engine_bench
from halkspeech.model import step_kernel
from halkspeech.model.cache import KVCache
from halkspeech.model.triton_step import _sync
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
WANT = sys.argv[2] if len(sys.argv) > 2 else "DABC"
MODELS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["large-v3", "large-v3-turbo"]
DEV = torch.device("cuda")
R: dict = {"device": device_info(DEV)}
PROMPT = [50258, 50259, 50360, 50364]
DEFAULTS = {"warps": 8, "cooperative": True, "prefetch": 1, "tile": 8192, "key_block": 128, "poll": 0, "per_sm": 1}
VARIANTS = [
    ("fused", None),
    ("persistent", {}),
    ("no prefetch", {"prefetch": 0}),
    ("2 a SM, 4 warps", {"per_sm": 2, "warps": 4}),
    ("2 a SM, 4 warps, tile 4096", {"per_sm": 2, "warps": 4, "tile": 4096}),
    ("2 a SM, 4 warps, no prefetch", {"per_sm": 2, "warps": 4, "prefetch": 0}),
    ("4 a SM, 2 warps, tile 4096", {"per_sm": 4, "warps": 2, "tile": 4096}),
]


def section(name, fn):
    if name[0] in WANT:
        run_section(R, name, fn, OUT / "step.json", preview=3000)


def setup(name: str):
    w = random_weights(name, dtype=torch.float16, device=DEV)
    model = Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=torch.float16, device=DEV)
    assert model.decoder.use_fused_kernels(16)
    stacked = step_kernel.StackedLayers.adopt(model.decoder.blocks, w.dims.n_text_head)
    cache = KVCache.allocate(w.dims, 2, dtype=torch.float16, device=DEV)
    audio = torch.randn(1, w.dims.n_audio_ctx, w.dims.n_audio_state, device=DEV, dtype=torch.float16)
    with torch.inference_mode():
        model.decoder.fill_cross(audio, cache, torch.tensor([0], device=DEV))
        model.decoder.prefill(torch.tensor([PROMPT], device=DEV), cache, torch.tensor([0], device=DEV))
    return model, stacked, cache


def correctness() -> dict:
    out = {}
    for name in MODELS:
        model, stacked, cache = setup(name)
        start = cache.self_kv.clone()
        steps, tokens = 40, []

        def run(persistent: bool):
            cache.self_kv.copy_(start)
            model.decoder.persistent = stacked if persistent else None
            logits = []
            tok, pos = torch.tensor([PROMPT[-1]], device=DEV), torch.tensor([len(PROMPT)], device=DEV)
            with torch.inference_mode():
                for i in range(steps):
                    lg = model.decoder.step(tok, pos, cache, 0)
                    logits.append(lg.float())
                    if not persistent:
                        tokens.append(int(lg.argmax()))
                    tok, pos = torch.tensor([tokens[i]], device=DEV), pos + 1
            torch.cuda.synchronize()
            return logits

        want = run(False)
        got = run(True)
        diffs = [float((a - b).abs().max()) for a, b in zip(want, got, strict=True)]
        agree = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(want, got, strict=True))
        model.decoder.persistent = stacked
        x = torch.randn(1, model.dims.n_text_state, device=DEV, dtype=torch.float16)
        handle = step_kernel.decoder_layers(x, torch.tensor([5], device=DEV), stacked, cache)
        out[name] = {
            "max_abs_diff": max(diffs),
            "diff_first_last": [diffs[0], diffs[-1]],
            "logit_scale": float(want[0].abs().max()),
            "argmax_agree": f"{agree}/{steps}",
            "stuck": int(stacked.scratch["stuck"].item()),
            "bars_left": stacked.scratch["bars"].tolist().count(0),
            "n_regs": getattr(handle, "n_regs", None),
            "n_spills": getattr(handle, "n_spills", None),
        }
    return out


def replay() -> dict:
    out = {}
    for name in MODELS:
        model, stacked, cache = setup(name)
        tok, pos = torch.tensor([PROMPT[-1]], device=DEV), torch.tensor([len(PROMPT)], device=DEV)
        rows = {}
        for label, options in VARIANTS:
            try:
                model.decoder.persistent = stacked if options is not None else None
                for key, value in {**DEFAULTS, **(options or {})}.items():
                    setattr(stacked, key, value)
                stream = torch.cuda.Stream()
                with torch.inference_mode(), torch.cuda.stream(stream):
                    for _ in range(3):
                        model.decoder.step(tok, pos, cache, 0)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        model.decoder.step(tok, pos, cache, 0)
                torch.cuda.synchronize()

                def many(graph=graph):
                    for _ in range(50):
                        graph.replay()

                ms = [cuda_ms(many, repeats=5) / 50 for _ in range(2)]
                rows[label] = {"step_ms": ms, "stuck": int(stacked.scratch["stuck"].item())}
            except Exception as exc:  # one variant failing (a launch option) must not cost the others
                rows[label] = {"error": repr(exc)[:400]}
            print(label, rows[label], flush=True)
        out[name] = rows
    return out


def engine() -> dict:
    out = {}
    for persistent in (False, True):
        res = run_engine_bench(
            EngineBenchConfig(
                models=tuple(MODELS), batches=(1,), compare_hf=False, repeats=5, persistent_step=persistent
            )
        )
        out[f"persistent={persistent}"] = res["rows"] if isinstance(res, dict) and "rows" in res else res
    return out


@triton.jit
def barriers_kernel(bars_ptr, stuck_ptr, n, POLL: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    bar = 0
    for _ in range(n):
        bar = _sync(bars_ptr, bar, pid, programs, stuck_ptr, POLL)


def barriers() -> dict:
    """Grid barriers alone: one program per SM, 255 barriers a launch (large-v3's count), each way of polling."""
    programs = torch.cuda.get_device_properties(DEV).multi_processor_count
    out = {}
    for poll in (0, 1):
        for warps in (4, 8):
            bars = torch.zeros(256, dtype=torch.int32, device=DEV)
            stuck = torch.zeros(1, dtype=torch.int32, device=DEV)

            def launch(bars=bars, stuck=stuck, poll=poll, warps=warps):
                bars.zero_()
                barriers_kernel[(programs,)](bars, stuck, 255, POLL=poll, num_warps=warps)

            ms = cuda_ms(launch, repeats=20)
            out[f"poll {poll}, {warps} warps"] = {"us_per_barrier": ms * 1000 / 255, "stuck": int(stuck.item())}
    return out


section("D barriers", barriers)
section("A correctness", correctness)
section("B replay", replay)
section("C engine", engine)
