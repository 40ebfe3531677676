"""The decoder's step with its cross-attention over the audio (model/absorbed.py) against the step over keys and
values, on a GPU: random weights of catalog shapes, random audio, the engine's step paths (fused kernels up to 16
slots, the plain step above with the Triton self-attention).

For each model and batch: both steps from the same prefilled cache, teacher-forced with the plain step's greedy
tokens for STEPS steps; the largest logit difference (and the logits' scale), the share of rows whose argmax agrees,
and each step's replay time from a CUDA graph (median of 20).

    PYTHONPATH=src python bench/gpu_absorbed_step.py OUT.json [--models large-v3,large-v3-turbo,tiny]
        [--batches 32,64,128,256]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from gpu_absorbed_cross import graph_ms  # a CUDA graph's replay time
from halkspeech.bench.common import device_info
from halkspeech.model.cache import KVCache
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

STEPS = 10


def run_model(name: str, batches: list[int]) -> list[dict[str, Any]]:
    weights = random_weights(name)
    dims = weights.dims
    model = Whisper.from_openai_state_dict(dims, weights.state_dict, dtype=torch.float16, device="cuda")
    model.decoder.use_fused_kernels(16)
    tokenizer = Tokenizer.for_model(dims)
    prompt, _ = tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
    rows = []
    for batch in batches:
        row: dict[str, Any] = {"model": name, "batch": batch}
        cache = KVCache.allocate(dims, batch, dtype=torch.float16, device="cuda", audio=True)
        g = torch.Generator(device="cuda").manual_seed(batch)
        audio = torch.randn(batch, dims.n_audio_ctx, dims.n_audio_state, generator=g, device="cuda").half()
        slots = torch.arange(batch, device="cuda")
        with torch.inference_mode():
            model.decoder.fill_cross(audio, cache, slots)
            model.decoder.prefill(torch.tensor([list(prompt)] * batch, device="cuda"), cache, slots)
            start = torch.full((batch,), len(prompt), device="cuda")
            forced: list[torch.Tensor] = []
            logits: dict[int, list[torch.Tensor]] = {}
            for min_batch in (0, 32):  # keys and values, then the audio (steps of 32 slots and more)
                row[f"absorbed_{min_batch}"] = model.decoder.use_absorbed_cross(min_batch)
                tokens, positions = torch.full((batch,), tokenizer.eot - 1, device="cuda"), start.clone()
                logits[min_batch] = []
                for i in range(STEPS):
                    out = model.decoder.step(tokens, positions, cache, 0)
                    logits[min_batch].append(out.float())
                    if min_batch == 0:
                        forced.append(out.argmax(-1))
                    tokens, positions = forced[i], positions + 1
                tokens, positions = forced[0], start.clone()
                row[f"step_ms_{min_batch}"] = round(
                    graph_ms(lambda t=tokens, p=positions: model.decoder.step(t, p, cache, 0)), 4
                )
            diff = max(float((a - b).abs().max()) for a, b in zip(logits[0], logits[32], strict=True))
            agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits[0], logits[32], strict=True))
            row |= {
                "max_logit_diff": round(diff, 5),
                "logit_scale": round(float(logits[0][0].abs().max()), 3),
                "argmax_agree": f"{agree}/{batch * STEPS}",
            }
        model.decoder.use_absorbed_cross(0)
        del cache
        torch.cuda.empty_cache()
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON to write")
    parser.add_argument("--models", default="large-v3,large-v3-turbo,tiny")
    parser.add_argument("--batches", default="32,64,128,256")
    args = parser.parse_args()
    result: dict[str, Any] = {"device": device_info(torch.device("cuda")), "steps": STEPS, "rows": []}
    for name in args.models.split(","):
        result["rows"] += run_model(name, [int(b) for b in args.batches.split(",")])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
