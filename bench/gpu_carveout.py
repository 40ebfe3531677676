"""Experiment: does leaving SMs free in cuBLAS(Lt) GEMMs (torch._C._set_sm_carveout_experimental) let the decode
steps run beside the encoder when it encodes ahead on its side stream? turbo's mixed workload, one lease.

Run: PYTHONPATH=src python bench/gpu_carveout.py OUT.json [carveouts, e.g. 0,16,32]
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from halkspeech.bench.common import device_info
from halkspeech.bench.mixed import MixedConfig, bench_mixed_model

OUT = sys.argv[1]
CARVEOUTS = [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "0,16,32").split(",")]
default = torch._C._get_sm_carveout_experimental()
cfg = MixedConfig(models=("large-v3-turbo",), requests=512)
rows = []


def run(modes: tuple[str, ...], carveout: int | None) -> None:
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        for row in bench_mixed_model("large-v3-turbo", dataclasses.replace(cfg, modes=modes)):
            row["carveout"] = carveout
            rows.append(row)
            keys = ("batching", "carveout", "wall_s", "windows_per_s", "p95_s", "encode_s", "step_s")
            print({k: row[k] for k in keys}, flush=True)
    finally:
        torch._C._set_sm_carveout_experimental(default)
    with open(OUT, "w") as f:
        json.dump({"device": device_info(torch.device("cuda")), "rows": rows}, f, indent=1)


run(("static-padded", "continuous"), default)
for c in CARVEOUTS:
    run(("continuous-ahead",), c)
run(("static-padded",), default)
