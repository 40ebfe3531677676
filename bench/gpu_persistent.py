"""The persistent batch-1 decode step (model/persistent.py) on the GPU, in one call:

  A. correctness: 40 teacher-forced steps of one slot, random weights of each shape with random biases and
     LayerNorms (the catalog's random weights have zero biases, which would hide a bias read from the wrong
     row), the persistent kernel against the fused launches it replaces: logits' largest difference against
     their scale, argmax agreement, the self-attention cache it wrote, barriers given up on
  B. step graph replay at batch 1: fused launches against the persistent kernel (cooperative launch or not)
  C. one 30 s window with 80 forced tokens through the whole engine (`bench engine` at batch 1), the
     persistent step off and on

Run: PYTHONPATH=src python bench/gpu_persistent.py OUT_DIR [sections, e.g. ABC] [models, e.g. large-v3,tiny.en]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_explore import run_section
from halkspeech.bench.common import cuda_ms, device_info
from halkspeech.bench.engine_bench import EngineBenchConfig, run_engine_bench
from halkspeech.model.cache import KVCache
from halkspeech.model.persistent import PersistentStep
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
WANT = sys.argv[2] if len(sys.argv) > 2 else "ABC"
MODELS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["large-v3", "large-v3-turbo", "tiny.en"]
DEV = torch.device("cuda")
R: dict = {"device": device_info(DEV)}
PROMPT = [50258, 50259, 50360, 50364]


def section(name, fn):
    if name[0] in WANT:
        run_section(R, name, fn, OUT / "persistent.json", preview=4000)


def setup(name: str, dtype=torch.float16, prompt=PROMPT):
    w = random_weights(name, dtype=dtype, device=DEV, seed=1)
    model = Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=dtype, device=DEV)
    g = torch.Generator(device=DEV).manual_seed(2)
    with torch.no_grad():
        for pname, p in model.decoder.named_parameters():
            if pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, device=DEV) * 0.05)
            elif "ln" in pname and pname.endswith("weight"):
                p.copy_(1 + torch.randn(p.shape, generator=g, device=DEV) * 0.1)
        model.decoder.positional_embedding.copy_(
            torch.randn(model.decoder.positional_embedding.shape, generator=g, device=DEV) * 0.02
        )
    assert model.decoder.use_fused_kernels(16)
    cache = KVCache.allocate(w.dims, 4, dtype=dtype, device=DEV)
    audio = torch.randn(1, w.dims.n_audio_ctx, w.dims.n_audio_state, device=DEV, dtype=dtype, generator=g)
    with torch.inference_mode():
        model.decoder.fill_cross(audio, cache, torch.tensor([0], device=DEV))
        model.decoder.prefill(torch.tensor([prompt], device=DEV), cache, torch.tensor([0], device=DEV))
    return model, cache


def correctness() -> dict:
    out = {}
    cases = [(m, torch.float16) for m in MODELS] + [(MODELS[-1], torch.bfloat16)]
    for name, dtype in cases:
        model, cache = setup(name, dtype)
        t0 = time.perf_counter()
        persistent = PersistentStep(
            list(model.decoder.blocks),
            model.decoder.token_embedding.weight,
            model.decoder.positional_embedding,
            model.dims,
        )
        built_s = time.perf_counter() - t0
        start = cache.self_kv.clone()
        steps = 40
        tokens = []

        def run(use, cooperative=True):
            cache.self_kv.copy_(start)
            persistent.cooperative = cooperative
            model.decoder.persistent = persistent if use else None
            logits = []
            tok, pos = torch.tensor([PROMPT[-1]], device=DEV), torch.tensor([len(PROMPT)], device=DEV)
            with torch.inference_mode():
                for i in range(steps):
                    lg = model.decoder.step(tok, pos, cache, 0)
                    logits.append(lg.float().clone())
                    if not use:
                        tokens.append(int(lg.argmax()))
                    tok, pos = torch.tensor([tokens[i]], device=DEV), pos + 1
            torch.cuda.synchronize()
            return logits, cache.self_kv[:, 0].clone()

        want, kv_want = run(False)
        row = {"dtype": str(dtype), "build_s": round(built_s, 2), "plan": persistent.plan.layout()["SHARED_BYTES"]}
        for coop in (True, False):
            got, kv_got = run(True, coop)
            diffs = [float((a - b).abs().max()) for a, b in zip(want, got, strict=True)]
            agree = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(want, got, strict=True))
            row["cooperative" if coop else "plain"] = {
                "max_abs_diff": max(diffs),
                "diff_first_last": [diffs[0], diffs[-1]],
                "logit_scale": float(want[0].abs().max()),
                "argmax_agree": f"{agree}/{steps}",
                "kv_max_diff": float((kv_want.float() - kv_got.float()).abs().max()),
                "kv_scale": float(kv_want.float().abs().max()),
                "barrier_gave_up": int(persistent.barrier[2].item()),
                "barrier_counts": persistent.barrier.tolist(),
            }
        out[f"{name}/{str(dtype)[6:]}"] = row
        print(name, dtype, row, flush=True)
        model.decoder.persistent = None
        del model, cache, persistent
        torch.cuda.empty_cache()
    return out


VARIANTS = [  # label, persistent kernel or the fused launches, extra defines (timing experiments)
    ("fused", False, ()),
    ("persistent", True, ()),
    ("barriers + prefetch (no phase bodies)", True, (("PHASE_MASK", 0),)),
    ("barriers alone", True, (("PHASE_MASK", 0), ("PREFETCH", 0))),
    ("bodies + barriers, no prefetch", True, (("PREFETCH", 0),)),
    *(
        ((f"phase {t} alone, no prefetch", True, (("PREFETCH", 0), ("PHASE_MASK", 1 << t))) for t in range(7))
        if "phases" in sys.argv
        else ()
    ),
    ("fused again", False, ()),
]


def replay() -> dict:
    out = {}
    for name in MODELS:
        model, cache = setup(name)
        tok, pos = torch.tensor([PROMPT[-1]], device=DEV), torch.tensor([len(PROMPT) + 40], device=DEV)
        rows = {}
        for label, use, experiment in VARIANTS:
            try:
                persistent = PersistentStep(
                    list(model.decoder.blocks),
                    model.decoder.token_embedding.weight,
                    model.decoder.positional_embedding,
                    model.dims,
                    experiment=experiment,
                )
                model.decoder.persistent = persistent if use else None
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

                ms = [round(cuda_ms(many, repeats=5) / 50, 4) for _ in range(3)]
                rows[label] = {"step_ms": ms, "gave_up": int(persistent.barrier[2].item())}
            except Exception as exc:  # one variant failing must not cost the others
                rows[label] = {"error": repr(exc)[:400]}
            print(name, label, rows[label], flush=True)
        out[name] = rows
        model.decoder.persistent = None
        del model, cache
        torch.cuda.empty_cache()
    return out


def engine() -> dict:
    out = {}
    models = tuple(m for m in MODELS if m.startswith("large"))
    for persistent in (False, True, False, True):
        res = run_engine_bench(
            EngineBenchConfig(models=models, batches=(1,), compare_hf=False, repeats=5, persistent_step=persistent)
        )
        for row in res["rows"]:
            out.setdefault(f"{row['model']} persistent={persistent}", []).append(round(row["seconds"] * 1000, 1))
    return out


section("A correctness", correctness)
section("B replay", replay)
section("C engine", engine)
print("\n=== summary")
for key in ("A correctness", "B replay", "C engine"):
    if key in R:
        print(
            key,
            R[key]
            if key != "A correctness"
            else {
                k: (v.get("cooperative", v), v.get("plain")) if isinstance(v, dict) else v for k, v in R[key].items()
            },
        )
