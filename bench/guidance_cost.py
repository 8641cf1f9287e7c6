"""Time per step and peak memory of loss guidance, fast and full, against unguided sampling.

Each mode runs in its own process (peak resident memory is per process): the model is built, one
warm-up run is made, then the timed runs; the peak memory figure is the process's peak resident set
size minus its size just before sampling (on a GPU, torch's peak allocated memory instead).

    python bench/guidance_cost.py [--preset small] [--image-size 32] [--batch 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import emit, median


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_mode(args) -> dict:
    from difflab.config import ModelConfig
    from difflab.diffusion.generate import generate
    from difflab.diffusion.guidance import color_guidance
    from difflab.diffusion.request import GenerationRequest
    from difflab.models.build import build_model

    model = build_model(ModelConfig(preset=args.preset), args.image_size, 3, "none", seed=0)
    terms = [] if args.only == "none" else [color_guidance((0.33, 1.0, 0.67))]

    def run():
        generate(model, GenerationRequest(args.batch, sampler="ddim", steps=args.steps, guidance=terms,
                                          guidance_mode="fast" if args.only == "none" else args.only),
                 batch_size=args.batch)

    before = rss_mb()
    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"mode": args.only, "seconds_per_step": round(median(times) / args.steps, 4),
            "peak_extra_memory_mb": round(peak - before, 1), "runs": [round(t, 3) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["none", "fast", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(one_mode(args)))
        return
    rows = {}
    for mode in ("none", "fast", "full"):
        command = [sys.executable, __file__, "--only", mode] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                                                ("preset", "image_size", "batch", "steps", "repeats")]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    base = rows["none"]["seconds_per_step"]
    for row in rows.values():
        row["time_vs_unguided"] = round(row["seconds_per_step"] / base, 2)
    emit({"benchmark": "guidance_cost", "torch_threads": torch.get_num_threads(),
          "setup": {k: getattr(args, k) for k in ("preset", "image_size", "batch", "steps", "repeats")},
          "sampler": "ddim", "term": "color", "modes": rows})


if __name__ == "__main__":
    main()
