"""Threads for the work: training and sampling throughput at 1 and 2 threads, alone and beside a busy process.

Each job runs as a user runs it — `difflab train` / `difflab sample` in its own process — with
`--threads 1`, `--threads 2` and without (`auto`: difflab's own choice, cpu_threads.py), once with the
machine to itself and once beside another process that keeps one core busy (a Python loop, as a second
job or a browser would). Training rates are steps per
second from the run's metrics.csv, after its first logged row (the set-up and the first steps, which
choose kernels, are not counted); sampling rates are images per second of `difflab sample`'s own work,
the model's loading not counted.

Jobs: the `small` pixel model on digits (class-conditional, as the quickstart); the text model's VAE
stage and its UNet on `shapes` (quickstart --text's `small` preset); sampling both.

    python bench/threads.py [--steps 60] [--jobs 0,1,2,3,4]   # all jobs, or some (the samplers need 0 and 2)

Run it alone on the machine: it makes its own busy neighbour.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GRID_PROMPTS, emit

DIFFLAB = [sys.executable, "-m", "difflab", "-q"]
ENV = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # "auto" is difflab's own choice
SPIN = [sys.executable, "-c", "while True: pass"]


def training_rate(command: list[str], metrics: Path) -> float:
    """Steps per second between the first and the last row of metrics.csv."""
    subprocess.run(command, check=True, capture_output=True, env=ENV)
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("seconds")]  # not the evaluation's rows
    first, last = rows[0], rows[-1]
    return (int(last["step"]) - int(first["step"])) / (float(last["seconds"]) - float(first["seconds"]))


def sampling_rate(model: Path, count: int, steps: int, threads: int, out: Path) -> float:
    """Images per second of `generate` on a model loaded first (a child process: `--sample`)."""
    done = subprocess.run([sys.executable, __file__, "--sample", str(model), "--count", str(count), "--steps",
                           str(steps), *threads_flag(threads)], check=True, capture_output=True, text=True, env=ENV)
    return float(done.stdout.strip().splitlines()[-1])


def threads_flag(threads: int | None) -> list[str]:
    return [] if threads is None else ["--threads", str(threads)]


def sample_here(model: str, count: int, steps: int, threads: int | None) -> float:
    from difflab.cpu_threads import set_threads
    from difflab.diffusion.generate import generate
    from difflab.diffusion.request import GenerationRequest
    from difflab.storage.folder import load_model

    set_threads(threads)  # as the command line does
    loaded = load_model(model)
    text, classes = loaded.prompts is not None, len(loaded.class_names or [])

    def request(n: int, steps: int) -> GenerationRequest:
        return GenerationRequest(n, steps=steps, seed=0, prompts=GRID_PROMPTS[0] if text else None,
                                 class_labels=[i % classes for i in range(n)] if classes else None)

    generate(loaded, request(1, 2))  # kernels chosen, weights packed
    start = time.perf_counter()
    generate(loaded, request(count, steps))
    return count / (time.perf_counter() - start)


def jobs(work: Path, steps: int) -> dict:
    """name -> function(threads) -> rate; the runs they sample from are made by the training jobs."""
    pixel, text = work / "pixel", work / "text"

    def train_pixel(threads):
        return training_rate([*DIFFLAB, "train", "--data", "digits", "--conditioning", "class", "--model", "small",
                              "--steps", str(steps), "--log-every", "10", "--sample-every", "0", "--eval-every", "0",
                              *threads_flag(threads), "--out", str(pixel), "--overwrite"], pixel / "metrics.csv")

    def train_vae(threads):
        return training_rate([*DIFFLAB, "train", "--data", "shapes", "--conditioning", "text", "--model", "small",
                              "--vae-steps", str(steps), "--steps", "1", "--log-every", "10", "--sample-every", "0",
                              "--eval-every", "0", *threads_flag(threads), "--out", str(text), "--overwrite"],
                             text / "vae" / "metrics.csv")

    def train_unet(threads):  # a short VAE stage first (not counted)
        return training_rate([*DIFFLAB, "train", "--data", "shapes", "--conditioning", "text", "--model", "small",
                              "--vae-steps", "10", "--steps", str(steps), "--log-every", "10", "--sample-every",
                              "0", "--eval-every", "0", *threads_flag(threads), "--out", str(text),
                              "--overwrite"], text / "metrics.csv")

    return {
        "pixel small: training": train_pixel,
        "text small: VAE stage": train_vae,
        "text small: UNet": train_unet,
        "pixel small: sampling (16 images, 50 steps)": lambda t: sampling_rate(pixel, 16, 50, t, work),
        "text small: sampling (8 images, 30 steps, CFG)": lambda t: sampling_rate(text, 8, 30, t, work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--jobs", default="0,1,2,3,4", help="which jobs, by number (default all)")
    parser.add_argument("--sample", help=argparse.SUPPRESS)  # a child: sample from this model, print images/s
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample:
        print(sample_here(args.sample, args.count, args.steps, args.threads))
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        chosen = [int(j) for j in args.jobs.split(",")]
        for number, (name, run) in enumerate(jobs(Path(work), args.steps).items()):
            if number not in chosen:
                continue
            row = {"job": name}
            for busy in (False, True):
                spinner = subprocess.Popen(SPIN) if busy else None
                try:
                    time.sleep(1.0 if busy else 0)
                    for threads in (1, 2, None):
                        said = "auto" if threads is None else f"{threads} thread{'s' * (threads > 1)}"
                        row[f"{said}, {'busy' if busy else 'alone'}"] = round(run(threads), 3)
                finally:
                    if spinner:
                        spinner.kill()
                        spinner.wait()
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    emit({"benchmark": "threads", "steps": args.steps, "unit": "steps/s (training), images/s (sampling)",
          "rows": rows})


if __name__ == "__main__":
    main()
