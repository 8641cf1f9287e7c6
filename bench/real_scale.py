"""Stable Diffusion at its real size: SD 1.5 and SD 2.1 folders built from their published configs with
random weights (no download), sampled by difflab's `generate` and by `StableDiffusionPipeline.__call__`
on the same folder, scheduler and generators; loading timed against `from_pretrained`; the memory
estimate (difflab.memory) set beside the measured peaks.

    python bench/real_scale.py build --model sd15           # once: the folder, cached outside git
    python bench/real_scale.py sampling --model sd15        # 512×512, CFG 7.5, 10 steps, batch 1, CPU
    python bench/real_scale.py sampling --device cuda --steps 20 --batch 1 4 [--model sd21]   # GPU rows
    python bench/real_scale.py loading --model sd15         # difflab's load_model against from_pretrained
    python bench/real_scale.py dreambooth [its options]     # one DreamBooth step: runs bench/real_scale_train.py
    python bench/real_scale.py sampling --tiny              # the same, on a scaled-down config (seconds)

Each side runs in its own fresh process (so one side's freed memory cannot hide the other's), the sides
take turns (difflab, diffusers, difflab, diffusers, ...) so that a change in the machine's load falls on
both, and every run is reported. Peak memory: on the CPU, the weights' bytes plus the largest growth of
the memory the C allocator has handed out (glibc's mallinfo2) during the call, and the process's peak
resident set; on a GPU, torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common import emit, median
from difflab.memory import peak_growth

PROMPT = "a photograph of an astronaut riding a horse"
CACHE = Path(os.environ.get("DIFFLAB_BENCH_CACHE", Path.home() / ".cache" / "difflab-bench"))
SAMPLER = "ddim"  # the same scheduler class on both sides (difflab's "ddim" is diffusers' DDIMScheduler)


# ---- the folders -----------------------------------------------------------------------------------

def configs(model: str, tiny: bool) -> dict:
    """Component configs: SD 1.5's and SD 2.1's as published (runwayml/stable-diffusion-v1-5,
    stabilityai/stable-diffusion-2-1), or the same shapes scaled down (`tiny`)."""
    sd21 = model == "sd21"
    unet = dict(sample_size=96 if sd21 else 64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024 if sd21 else 768,
                attention_head_dim=[5, 10, 20, 20] if sd21 else 8, use_linear_projection=sd21, upcast_attention=sd21,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, sample_size=768 if sd21 else 512)
    # SD 2.1: OpenCLIP ViT-H's text tower (1024 wide, 23 layers, gelu); SD 1.5: CLIP ViT-L/14's (768, 12, quick_gelu)
    text = (dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 hidden_act="gelu", projection_dim=512) if sd21 else
            dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 hidden_act="quick_gelu", projection_dim=768))
    text.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if tiny:  # the same layout at a few million parameters, 64 px images
        unet.update(sample_size=8, block_out_channels=[32, 64, 128, 128], cross_attention_dim=64,
                    attention_head_dim=[2, 4, 8, 8] if sd21 else 8, norm_num_groups=16)
        vae.update(block_out_channels=[16, 32, 64, 64], norm_num_groups=16, sample_size=64)
        text.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                    projection_dim=64, vocab_size=1000)
    scheduler = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if sd21 else "epsilon",
                     timestep_spacing="leading", num_train_timesteps=1000)
    size = (768 if sd21 else 512) if not tiny else 64
    return {"unet": unet, "vae": vae, "text": text, "scheduler": scheduler, "size": size}


def folder_for(model: str, tiny: bool) -> Path:
    return CACHE / f"{model}{'-tiny' if tiny else ''}"


def build(model: str, tiny: bool) -> Path:
    """The model's folder, built once (random weights, seed 0) and kept in CACHE."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = folder_for(model, tiny)
    if (folder / "model_index.json").is_file():
        return folder
    c = configs(model, tiny)
    torch.manual_seed(0)
    partial = folder.with_name(folder.name + ".partial")
    vocabulary = partial / "vocabulary"
    vocabulary.mkdir(parents=True, exist_ok=True)
    # A small word vocabulary: the text encoder's embedding has the real size, the prompt's ids are in range.
    words = sorted(set(PROMPT.split()) | {"a", "photo", "of", "sks", "dog"})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(words)}}
    (vocabulary / "vocab.json").write_text(json.dumps(vocab))
    (vocabulary / "merges.txt").write_text("#version: 0.2\n")
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**c["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**c["text"])),
        tokenizer=CLIPTokenizer(str(vocabulary / "vocab.json"), str(vocabulary / "merges.txt"), model_max_length=77),
        unet=diffusers.UNet2DConditionModel(**c["unet"]),
        scheduler=diffusers.DDIMScheduler(**c["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(partial / "model", safe_serialization=True)
    (partial / "model").rename(folder)
    shutil.rmtree(partial)
    return folder


# ---- one side, in its own process --------------------------------------------------------------------

def peak_during(fn, device: str):
    """(fn's result, the largest growth of allocated memory while it ran, in bytes)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base
    result = []
    growth = peak_growth(lambda: result.append(fn()), every=0.002)
    return result[0], growth


def weight_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def run_side(args) -> dict:
    """Load the folder and make one batch, timing both: difflab's load_model + generate, or diffusers'
    from_pretrained + StableDiffusionPipeline.__call__ with the same scheduler and generators."""
    import diffusers
    import numpy as np

    device = args.device
    size = args.size
    started = time.perf_counter()
    if args.side == "difflab":
        from difflab.cli.sample import half_weights
        from difflab.diffusion.generate import generate
        from difflab.diffusion.request import GenerationRequest
        from difflab.models.offload import offload
        from difflab.storage.folder import load_model

        dtype, variant = half_weights(args.precision, torch.device(device))  # as `difflab sample` loads
        model = load_model(args.folder, device="cpu" if args.offload else device, safety_checker=False,
                           dtype=dtype, variant=variant)
        if args.offload:
            offload(model, device)
        model.freeze()
        loaded = time.perf_counter() - started
        modules = model.modules()
        grads = sum(p.requires_grad for m in modules for p in m.parameters())

        def sample():
            return generate(model, GenerationRequest(args.batch, sampler=SAMPLER, steps=args.steps, seed=0,
                                                     prompts=PROMPT, cfg_scale=7.5, width=size, height=size,
                                                     precision=args.precision))
    else:
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None,
                                                                 requires_safety_checker=False, torch_dtype=dtype)
        if args.offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(device)
        loaded = time.perf_counter() - started
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
        grads = sum(p.requires_grad for m in modules for p in m.parameters())
        pipe.set_progress_bar_config(disable=True)

        def sample():
            generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
            out = pipe([PROMPT] * args.batch, num_inference_steps=args.steps, guidance_scale=7.5,
                       generator=generators, height=size, width=size, output_type="pt").images
            return out.float().cpu()

    weights = weight_bytes(modules)
    started = time.perf_counter()
    images, growth = peak_during(sample, device)
    seconds = time.perf_counter() - started
    np.save(args.images, images.numpy())
    return {"side": args.side, "load_seconds": round(loaded, 3), "sample_seconds": round(seconds, 3),
            "weights_bytes": weights, "peak_growth_bytes": growth, "peak_bytes": weights + growth,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "parameters_requiring_grad": int(grads)}


def side_process(side: str, folder: Path, args, images: Path, batch: int) -> dict:
    command = [sys.executable, __file__, "side", "--side", side, "--folder", str(folder), "--device", args.device,
               "--steps", str(args.steps), "--batch", str(batch), "--size", str(args.size),
               "--precision", args.precision, "--images", str(images)] + (["--offload"] if args.offload else [])
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the parts ---------------------------------------------------------------------------------------

def sampling(args) -> dict:
    import numpy as np

    from difflab.memory import ModelShape, estimate_sampling

    folder = build(args.model, args.tiny)
    args.size = args.size or configs(args.model, args.tiny)["size"]
    rows = []
    for batch in args.batch:
        runs = {"difflab": [], "diffusers": []}
        images = {}
        for _ in range(args.repeats):
            for side in ("difflab", "diffusers"):  # taking turns
                path = CACHE / f"images-{side}.npy"
                runs[side].append(side_process(side, folder, args, path, batch))
                images[side] = np.load(path)
        gib = 2 ** 30
        seconds = {side: median([r["sample_seconds"] for r in rs]) for side, rs in runs.items()}
        peak = {side: median([r["peak_bytes"] for r in rs]) for side, rs in runs.items()}
        estimate = estimate_sampling(ModelShape.of_folder(folder), height=args.size, width=args.size, batch=batch,
                                     cfg=True, precision=args.precision, offload=args.offload)
        difference = np.abs(images["difflab"] - images["diffusers"]).max()
        rows.append({
            "batch": batch,
            "sample_seconds": seconds,
            "time_ratio_difflab_vs_diffusers": round(seconds["difflab"] / seconds["diffusers"], 4),
            "peak_gib": {side: round(v / gib, 3) for side, v in peak.items()},
            "peak_ratio_difflab_vs_diffusers": round(peak["difflab"] / peak["diffusers"], 4),
            "estimate_gib": round(estimate.total / gib, 3),
            "estimate_vs_measured_difflab": round(estimate.total / peak["difflab"], 3),
            "estimate_parts_gib": {k: round(v / gib, 3) for k, v in estimate.parts.items()},
            "images_max_abs_difference": float(difference),
            "runs": runs,
        })
    return {"setup": {"model": args.model, "tiny": args.tiny, "size": args.size, "steps": args.steps,
                      "cfg_scale": 7.5, "sampler": SAMPLER, "precision": args.precision, "offload": args.offload,
                      "device": args.device, "repeats_per_side": args.repeats,
                      "model_shape": asdict(ModelShape.of_folder(folder)),
                      "targets": {"time_ratio": "<= 1.03", "peak": "difflab <= diffusers", "estimate": "within 15%"}},
            "rows": rows}


def loading(args) -> dict:
    """Time to load the folder: difflab's load_model against diffusers' from_pretrained, taking turns,
    each in a fresh process (the files are in the page cache after the first)."""
    folder = build(args.model, args.tiny)
    code = {
        "difflab": "from difflab.storage.folder import load_model as f; f({!r}, safety_checker=False)",
        "diffusers": "import diffusers, torch; diffusers.StableDiffusionPipeline.from_pretrained({!r}, "
                     "safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)",
    }
    timed = ("import time, sys; {imports}; s=time.perf_counter(); {call}; print(time.perf_counter()-s)")
    seconds = {side: [] for side in code}
    for _ in range(args.repeats + 1):  # the first round warms the page cache and is not counted
        for side, call in code.items():
            imports = "import diffusers, transformers, difflab.storage.folder"
            out = subprocess.run([sys.executable, "-c", timed.format(imports=imports, call=call.format(str(folder)))],
                                 capture_output=True, text=True, check=True)
            seconds[side].append(float(out.stdout.strip().splitlines()[-1]))
    counted = {side: values[1:] for side, values in seconds.items()}
    med = {side: median(v) for side, v in counted.items()}
    return {"setup": {"model": args.model, "tiny": args.tiny, "repeats": args.repeats},
            "load_seconds": {k: round(v, 3) for k, v in med.items()},
            "ratio_difflab_vs_from_pretrained": round(med["difflab"] / med["diffusers"], 3),
            "target": "<= 1.10", "runs": {k: [round(x, 3) for x in v] for k, v in seconds.items()}}


def dreambooth(args, extra: list[str]) -> None:
    """One DreamBooth step at 512 px: the training side's rows, bench/real_scale_train.py (run as it is, its
    JSON printed as it prints it; options this script does not know are passed on to it)."""
    script = Path(__file__).with_name("real_scale_train.py")
    if not script.is_file():
        raise SystemExit("bench/real_scale_train.py (the DreamBooth step rows) is not in this checkout; it comes "
                         "with the training-side memory features of issue 25")
    command = [sys.executable, str(script), "--device", args.device, *(["--tiny"] if args.tiny else []), *extra]
    raise SystemExit(subprocess.run(command).returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("build", "sampling", "loading", "dreambooth", "side"))
    parser.add_argument("--model", choices=("sd15", "sd21"), default="sd15")
    parser.add_argument("--tiny", action="store_true", help="a scaled-down config with the same layout (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--size", type=int, help="image side (default: the model's, 512 or 768; 64 with --tiny)")
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--offload", action="store_true", help="model CPU offload on both sides (GPU)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per side (default 1)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.part == "dreambooth":
        dreambooth(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.part == "side":  # a child process
        args.batch = args.batch[0]
        print(json.dumps(run_side(args)))
        return
    if args.part == "build":
        print(build(args.model, args.tiny))
        return
    result = {"sampling": sampling, "loading": loading}[args.part](args)
    emit({"benchmark": f"real_scale_{args.part}", **result})


if __name__ == "__main__":
    main()
