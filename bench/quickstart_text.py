"""`difflab quickstart --text` as a learner runs it: wall-clock and CPU time, the estimate it printed
before training, the steps it trained, and its own evaluation (prompt adherence, the VAE's ceiling).

    OMP_NUM_THREADS=1 python bench/quickstart_text.py --busy        # one core beside a busy process
    python bench/quickstart_text.py --threads 2                      # two free cores
    python bench/quickstart_text.py --fresh-cache                    # also trains the attribute reader

`--busy` keeps one CPU-bound process running beside the quickstart (the issue's test: one core free,
another program busy on the other). The CPU seconds are the quickstart's own (user + system, all its
threads): on a machine busier than that, they are the time it would take with its core to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

BUSY = "while True: pass"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--busy", action="store_true", help="run a CPU-bound process beside it")
    parser.add_argument("--fresh-cache", action="store_true", help="an empty DIFFLAB_CACHE: the reader trains too")
    parser.add_argument("--steps", type=int, help="passed to the quickstart (default: its own plan)")
    parser.add_argument("-n", "--count", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-quickstart-text"))
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cache = tempfile.TemporaryDirectory() if args.fresh_cache else None
    if cache:
        env["DIFFLAB_CACHE"] = cache.name
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if args.busy else None
    command = [sys.executable, "-m", "difflab", "quickstart", "--text", "--out", str(args.workdir), "-n",
               str(args.count), *(["--steps", str(args.steps)] if args.steps else [])]
    try:
        started, cpu_before = time.perf_counter(), cpu_seconds()
        args.workdir.mkdir(parents=True, exist_ok=True)
        log = args.workdir.with_name(args.workdir.name + ".log")
        with log.open("w") as said:  # what a learner reads, kept beside the run folder
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=said, check=True)
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    finally:
        if busy:
            busy.kill()
        if cache:
            cache.cleanup()
    said = log.read_text()
    estimate = re.search(r"should take about ([\d.]+ \w+)", said) or re.search(r"instead .*?: about ([\d.]+ \w+)",
                                                                              said)
    result = json.loads((args.workdir / "eval.json").read_text())
    training = json.loads((args.workdir / "model" / "difflab.json").read_text())["training"]
    emit({
        "threads": args.threads, "busy_beside": bool(args.busy), "load_average": round(os.getloadavg()[0], 2),
        "estimate": estimate.group(1) if estimate else None,
        "too_slow_warning": "too slow" in said,
        "wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2),
        "unet_steps": training["steps"], "vae_psnr": training.get("vae_psnr"),
        "seen": result["adherence"].get("seen"), "held_out": result["adherence"].get("held_out"),
        "vae_ceiling": result.get("vae_ceiling"),
        "frechet_distance": result["frechet_distance"], "frechet_floor": result["frechet_floor"],
        "grid": str(next((args.workdir / "samples").glob("step_*.png"), "")),
    })


if __name__ == "__main__":
    main()
