"""GPU exploration in one call: correctness of the GPU path, where the time goes, and the HF comparison.

Run on the device machine: PYTHONPATH=src python bench/gpu_explore.py OUT_DIR
Prints short tables; writes explore.json under OUT_DIR.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from halkspeech.bench.common import cuda_ms, device_info
from halkspeech.bench.engine_bench import EngineBenchConfig, _features, run_engine_bench
from halkspeech.bench.hf_baseline import HFWhisper
from halkspeech.engine.batch import Admission, DecodeStep
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.model.whisper import Whisper

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
RESULTS: dict = {}
DEV = torch.device("cuda")


def run_section(results: dict, name: str, fn, path: Path, preview: int = 0) -> None:
    """One part of a GPU call: results[name] = fn() (or its error: one failed part must not cost the whole call),
    its first `preview` characters printed, then every result so far rewritten to `path`."""
    print(f"\n=== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        results[name] = fn()
        if preview:
            print(json.dumps(results[name], indent=1, default=str)[:preview], flush=True)
    except Exception as exc:
        traceback.print_exc()
        results[name] = {"error": repr(exc)}
    print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    path.write_text(json.dumps(results, indent=1, default=str))


def section(name, fn):
    run_section(RESULTS, name, fn, OUT / "explore.json")


def make_runner(model: Whisper, slots: int) -> tuple[Runner, TokenIds]:
    from halkspeech.model.tokenizer import Tokenizer

    tok = Tokenizer.for_model(model.dims)
    ids = TokenIds.from_tokenizer(tok, model.dims.n_vocab)
    return Runner(model, ids, slots=slots, max_encoder_batch=64, cuda_graphs=True), ids


def fill(runner: Runner, feats: torch.Tensor, count: int, prompt: tuple[int, ...], sot: int) -> None:
    opts = SamplingOptions(max_new_tokens=400, force_length=True, timestamps=False)
    adm = [Admission(i, DecodeRequest(feats[i % len(feats)], prompt, sot, opts), (i,), 0) for i in range(count)]
    for chunk in range(0, count, 64):
        part = adm[chunk : chunk + 64]
        job = runner.encode_async([a.request.features for a in part])
        job.wait()
        runner.admit(part, [(job, row) for row in range(len(part))])


def probe_model(name: str) -> dict:
    out: dict = {}
    hf = HFWhisper(name, DEV)
    weights = hf.weights()
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=torch.float16, device=DEV)
    feats = _features(64, weights.dims.n_mels, DEV)
    prompt, sot = hf.tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
    with torch.inference_mode():
        ours_enc = model.encoder(feats[:4].half())
        hf_enc = hf.encode(feats[:4])
        out["encoder_rel_err_vs_hf"] = ((ours_enc.float() - hf_enc.float()).norm() / hf_enc.float().norm()).item()
        # greedy tokens: HF generate vs our runner, same windows, 24 tokens, eot suppressed in both
        hf_tokens = hf.generate(feats[:4], prompt, 24)[:, -24:].tolist()
        runner, ids = make_runner(model, 8)
        fill(runner, feats, 4, prompt, sot)
        ours_tokens = [[int(runner.state.tokens[i])] for i in range(4)]
        for _ in range(23):
            o = runner.step(DecodeStep(size=4, window=64, active=(0, 1, 2, 3), timestamps=False, sampling=False))
            for i in range(4):
                ours_tokens[i].append(o.tokens[i])
        same = sum(a == b for x, y in zip(ours_tokens, hf_tokens, strict=True) for a, b in zip(x, y, strict=True))
        out["greedy_tokens_equal_vs_hf"] = f"{same}/{4 * 24}"
        out["first_tokens"] = {"ours": ours_tokens[0][:8], "hf": hf_tokens[0][:8]}
        # graph replay equals eager step
        r2, _ = make_runner(model, 8)
        r2.graphs = None
        fill(r2, feats, 4, prompt, sot)
        eager = [
            r2.step(DecodeStep(size=4, window=64, active=(0, 1, 2, 3), timestamps=True, sampling=False)).tokens
            for _ in range(5)
        ]
        r3, _ = make_runner(model, 8)
        fill(r3, feats, 4, prompt, sot)
        graph = [
            r3.step(DecodeStep(size=4, window=64, active=(0, 1, 2, 3), timestamps=True, sampling=False)).tokens
            for _ in range(5)
        ]
        out["graph_equals_eager"] = eager == graph
        del r2, r3, runner
        # encoder timing per backend (ours) and HF's encoder
        enc = {}
        for b in (1, 16, 64):
            x = feats[:b].half()
            enc[f"ours_b{b}_ms"] = cuda_ms(partial(model.encoder, x), repeats=5)
            enc[f"hf_b{b}_ms"] = cuda_ms(partial(hf.encode, x), repeats=5)
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
        ):
            try:
                with sdpa_kernel(backend):
                    enc[f"ours_b64_{backend.name}_ms"] = cuda_ms(partial(model.encoder, feats.half()), repeats=5)
            except Exception as exc:
                enc[f"ours_b64_{backend.name}_ms"] = repr(exc)[:80]
        out["encoder"] = enc
        del hf
        torch.cuda.empty_cache()
        # decode step: graph replay time per batch size (window 128) incl. host readback
        steps = {}
        runner, ids = make_runner(model, 256)
        fill(runner, feats, 256, prompt, sot)
        for b in (1, 16, 64, 256):
            st = DecodeStep(size=b, window=128, active=tuple(range(b)), timestamps=False, sampling=False)
            runner.step(st)
            steps[f"b{b}_step_ms_host"] = cuda_ms(lambda st=st: runner.step(st), repeats=20)
            graph = runner.graphs.graphs[(b, 128, False, False)][0]
            steps[f"b{b}_replay_ms"] = cuda_ms(graph.replay, repeats=20)
            st2 = DecodeStep(size=b, window=128, active=tuple(range(b)), timestamps=True, sampling=True)
            runner.step(st2)
            graph2 = runner.graphs.graphs[(b, 128, True, True)][0]
            steps[f"b{b}_replay_ts_sampling_ms"] = cuda_ms(graph2.replay, repeats=20)
        d = weights.dims
        dec_weights = sum(v.numel() for k, v in weights.state_dict.items() if k.startswith("decoder")) * 2
        cross = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state * 2
        steps["floor_ms_at_4.3TBps"] = {b: (dec_weights + b * cross) / 4.3e12 * 1e3 for b in (1, 16, 64, 256)}
        out["decode_step"] = steps
        del runner
    del model, weights
    torch.cuda.empty_cache()
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS["device"] = device_info(DEV)
    print(json.dumps(RESULTS["device"]), flush=True)
    for name in ("large-v3-turbo", "large-v3"):
        section(f"probe {name}", lambda name=name: probe_model(name))
        print(json.dumps(RESULTS[f"probe {name}"], indent=1, default=str), flush=True)
    section(
        "engine table",
        lambda: run_engine_bench(EngineBenchConfig(json_path=str(OUT / "engine.json"), repeats=3)),
    )


if __name__ == "__main__":
    main()
