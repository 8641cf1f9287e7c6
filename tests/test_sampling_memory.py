"""Sampling at scale, on tiny Stable Diffusion folders: the lazy check of damaged weights, half-precision
weights (no autocast copies, no gradients), fp16 weight variants, VAE slicing and tiling chosen by size,
model CPU offload's wiring, and the memory estimate that refuses what will not fit."""

from __future__ import annotations

import re

import pytest
import torch

import tiny_sd
from difflab.cli import main
from difflab.diffusion.generate import generate
from difflab.diffusion.request import GenerationRequest
from difflab.errors import ConfigError, ModelError
from difflab.memory import peak_growth
from difflab.storage.folder import load_model

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd") / "text", "text")


# ---- damaged weights, checked lazily -----------------------------------------------------------------

def test_a_large_models_damaged_tensor_is_named_when_it_is_first_used(folder, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from difflab.models import weights

    damaged = shutil.copytree(folder, tmp_path / "damaged")
    path = damaged / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(path))
    monkeypatch.setattr(weights, "LAZY_ABOVE_BYTES", 0)  # every module counts as large
    model = load_model(damaged)  # loading reads no values
    with pytest.raises(ModelError, match=r"vae is damaged: 1 of the .* values of decoder\.conv_out\.weight are NaN"):
        generate(model, GenerationRequest(1, steps=2, prompts=PROMPT))
    healthy = load_model(folder)
    monkeypatch.setattr(weights, "LAZY_ABOVE_BYTES", 256 * 2**20)
    eager = load_model(folder)
    request = GenerationRequest(1, steps=2, prompts=PROMPT)
    assert torch.equal(generate(healthy, request), generate(eager, request))
    assert not any(hasattr(m, "_difflab_weight_check") for m in healthy.codec.vae.decoder.modules())  # gone once run


@pytest.mark.parametrize("value, what", [(float("inf"), "infinite"), (3e9, "beyond"), (float("nan"), "NaN")])
def test_the_one_pass_check_finds_each_kind_of_damage(value, what):
    from difflab.models.weights import check_tensor

    tensor = torch.zeros(1000)
    check_tensor("w", tensor, "f")
    tensor[17] = value
    with pytest.raises(ModelError, match=f"1 of the 1,000 values of w are .*{what}"):
        check_tensor("w", tensor, "f")


# ---- half precision ----------------------------------------------------------------------------------

def test_half_precision_sampling_holds_half_weights_without_gradients_or_autocast(folder):
    model = load_model(folder, dtype=torch.bfloat16).freeze()
    parts = model.modules()
    assert all(p.dtype == torch.bfloat16 for m in parts for p in m.parameters())
    assert not any(p.requires_grad for m in parts for p in m.parameters())
    full = load_model(folder)
    half_bytes = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
    assert half_bytes * 2 == sum(p.numel() * p.element_size() for m in full.modules() for p in m.parameters())
    seen = []
    model.unet.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    half = generate(model, GenerationRequest(2, steps=4, prompts=PROMPT, precision="bf16"))
    assert seen and not any(seen)  # the weights are bf16 already: no autocast, so no cast copies
    exact = generate(full, GenerationRequest(2, steps=4, prompts=PROMPT, precision="no"))
    assert half.dtype == torch.float32 and (half - exact).abs().max() < 0.08  # bf16 rounding, not other images


def test_half_weights_are_chosen_for_half_precision_and_fp16_files_only_on_a_gpu():
    from difflab.cli.sample import half_weights

    assert half_weights("bf16", torch.device("cpu")) == (torch.bfloat16, None)
    assert half_weights("fp16", torch.device("cuda")) == (torch.float16, "fp16")
    assert half_weights("no", torch.device("cuda")) == (None, None)


def test_fp16_weight_files_are_read_when_the_folder_has_them(folder, tmp_path):
    import diffusers

    from difflab.storage.folder import folder_variant

    assert folder_variant(folder, "fp16") is None  # no variant files: the fp32 ones, cast
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    with_variant = tmp_path / "variant"
    pipe.save_pretrained(with_variant)
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)  # the fp16 files differ, so that reading them shows
    pipe.to(torch.float16).save_pretrained(with_variant, variant="fp16")
    model = load_model(with_variant, dtype=torch.float16, variant="fp16")
    assert model.unet.conv_out.weight.dtype == torch.float16 and not model.unet.conv_out.weight.any()
    assert load_model(with_variant, dtype=torch.float16).unet.conv_out.weight.any()  # without: the fp32 files


def test_a_hub_download_in_half_precision_fetches_the_fp16_files_only(monkeypatch, tmp_path):
    import fnmatch

    import huggingface_hub

    from difflab.storage.folder import download_patterns

    files = {"someone/sd": ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                            "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
                            "vae/diffusion_pytorch_model.fp16.safetensors"],
             "someone/full": ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / name))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: files[repo])

    def taken(repo, variant):
        patterns = download_patterns(repo, False, variant)
        return {f for f in files[repo] if any(fnmatch.fnmatch(f, p) for p in patterns["allow_patterns"])
                and not any(fnmatch.fnmatch(f, p) for p in patterns.get("ignore_patterns", []))}

    assert taken("someone/sd", "fp16") == {"model_index.json", "unet/config.json",
                                           "unet/diffusion_pytorch_model.fp16.safetensors",
                                           "vae/diffusion_pytorch_model.fp16.safetensors"}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in taken("someone/sd", None)
    assert "unet/diffusion_pytorch_model.safetensors" in taken("someone/full", "fp16")  # no fp16 files there


# ---- the VAE: slicing and tiling ---------------------------------------------------------------------

def test_several_images_decode_one_at_a_time_with_the_same_images_and_less_memory():
    from diffusers import AutoencoderKL

    from difflab.models.codec import LatentCodec, vae_modes

    torch.manual_seed(0)
    vae = AutoencoderKL(latent_channels=4, block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, sample_size=256).eval()
    codec = LatentCodec(vae)  # 128 px images: below the tiling size
    latents = torch.randn(8, 4, 64, 64)
    batches = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    with torch.no_grad():
        sliced = codec.decode(latents)  # (and a warm-up: the first call's allocations are not the decoding's)
        sliced_peak = peak_growth(lambda: codec.decode(latents), every=0.0002)
        with vae_modes(vae, slicing=False, tiling=False):
            whole = vae.decode(latents / codec.scaling_factor).sample
            whole_peak = peak_growth(lambda: vae.decode(latents / codec.scaling_factor), every=0.0002)
    assert set(batches[:8]) == {1}  # one image per decoder call
    assert (sliced - whole).abs().max() < 1e-5
    assert sliced_peak < 0.5 * whole_peak
    assert vae.use_slicing is False  # the VAE's own setting is left as it was


def test_an_image_too_large_for_the_free_memory_decodes_in_tiles_as_diffusers_does(folder, monkeypatch):
    from difflab import memory

    model = load_model(folder)
    vae = model.codec.vae
    tile = vae.config.sample_size
    latents = torch.randn(1, 4, 4 * tile // 2, 4 * tile // 2)  # a 64×64 image: 16 tiles' area
    sizes = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[-1]))
    with torch.no_grad():
        untiled = model.codec.decode(latents)  # the machine's memory: room enough
        monkeypatch.setattr(memory, "free_memory", lambda device: memory.decode_bytes(48, 48, 8, 4))
        ours = model.codec.decode(latents)
        vae.enable_tiling()
        theirs = vae.decode(latents / model.codec.scaling_factor).sample
        vae.disable_tiling()
        small = model.codec.decode(latents[..., :tile // 2, :tile // 2])  # one tile's size: not tiled
    assert sizes[0] == latents.shape[-1] and max(sizes[1:-1]) < latents.shape[-1] and sizes[-1] == tile // 2
    assert torch.equal(ours, theirs) and not torch.equal(ours, untiled)
    assert small.shape[-1] == tile


# ---- model CPU offload -------------------------------------------------------------------------------

def test_offload_hooks_each_network_and_gives_the_same_images(folder):
    from accelerate import cpu_offload_with_hook

    from difflab.models.offload import attach

    expected = generate(load_model(folder), GenerationRequest(2, steps=3, prompts=PROMPT))
    model = load_model(folder).freeze()
    attach(model, torch.device("cpu"), cpu_offload_with_hook)  # the wiring (a GPU test measures the memory)
    assert all(hasattr(m, "_hf_hook") for m in (model.prompts.text_encoder, model.denoiser, model.codec.vae))
    assert torch.equal(generate(model, GenerationRequest(2, steps=3, prompts=PROMPT)), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offload_lowers_the_gpus_peak(folder):
    from difflab.models.offload import offload

    peaks = []
    for offloaded in (False, True):
        model = load_model(folder, device="cpu" if offloaded else "cuda").freeze()
        if offloaded:
            offload(model, "cuda")
        torch.cuda.reset_peak_memory_stats()
        generate(model, GenerationRequest(1, steps=2, prompts=PROMPT))
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] < peaks[0]


def test_offload_on_the_cpu_is_refused_in_one_line(folder, capsys, tmp_path):
    code = main(["sample", "--model", str(folder), "--prompt", "a", "--offload", "--device", "cpu",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2 and "--offload moves each network to the GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---- the memory estimate -----------------------------------------------------------------------------

def test_sampling_that_will_not_fit_is_refused_with_the_flags_that_fit(folder, capsys, tmp_path, monkeypatch):
    from difflab import memory
    from difflab.memory import ModelShape, estimate_sampling

    shape = ModelShape.of_folder(folder)
    need = estimate_sampling(shape, height=16, width=16, batch=4, cfg=True)
    half = estimate_sampling(shape, height=16, width=16, batch=4, cfg=True, precision="fp16")
    weights = sum(p.numel() * 4 for m in load_model(folder).modules() for p in m.parameters())
    assert half.total < need.total and need.parts["weights"] == weights
    free = (half.total + need.total) / 2 - weights  # room for the half-precision run only
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    argv = ["sample", "--model", str(folder), "--prompt", "a", "-n", "4", "--batch-size", "4", "--steps", "1",
            "--height", "16", "--width", "16", "--precision", "no", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"estimated peak memory of sampling \d+ images? of \d+×\d+ on cpu", err)
    assert "add --precision fp16, or pass --yes" in err
    assert not (tmp_path / "x.png").exists()
    assert main([*argv, "--yes"]) == 0 and (tmp_path / "x.png").is_file()


def test_sampling_estimates_follow_the_flags():
    from difflab.memory import ModelShape, estimate_sampling

    sd15 = ModelShape(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863, latent_factor=8)
    plain = estimate_sampling(sd15, height=512, width=512, batch=4)
    assert estimate_sampling(sd15, height=512, width=512, batch=4, vae_slicing=False).total > plain.total
    assert estimate_sampling(sd15, height=512, width=512, batch=4, precision="fp16").total < 0.6 * plain.total
    offloaded = estimate_sampling(sd15, height=512, width=512, batch=1, precision="fp16", offload=True)
    assert offloaded.total < 4e9 and "UNet weights" in offloaded.parts  # the target: <= 4 GB
    big = estimate_sampling(sd15, height=1024, width=1024, batch=1, free=6e9)  # one image's decoding: 4 GB
    assert big.total < estimate_sampling(sd15, height=1024, width=1024, batch=1).total


def test_training_estimates_follow_the_flags_and_name_what_fits():
    from difflab.memory import ModelShape, estimate_training, training_remedies

    sd15 = ModelShape(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863, latent_factor=8)
    full = estimate_training(sd15, height=512, width=512, prior_preservation=True)
    # measured on the CPU: 15.7 GB (bench/real_scale_train.py); with a GPU's CUDA context, more than a T4's 16
    assert 15e9 < full.total < 22e9
    lean = dict(checkpointing=True, optimizer="adamw8bit", precision="fp16")
    assert estimate_training(sd15, height=512, width=512, prior_preservation=True, **lean).total < 15e9
    lora = estimate_training(sd15, height=512, width=512, prior_preservation=True, lora=True, precision="fp16")
    assert lora.total < 8e9
    assert training_remedies(sd15, 15e9, height=512, width=512, prior_preservation=True) == [
        "--gradient-checkpointing", "--optimizer adamw8bit"]
    with pytest.raises(ConfigError, match="unknown optimizer"):
        estimate_training(sd15, height=512, width=512, optimizer="sgd")


def test_a_training_run_that_will_not_fit_is_refused_with_the_flags_that_fit(monkeypatch):
    from difflab import memory
    from difflab.memory import ModelShape, check_training_memory

    sd15 = ModelShape(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863, latent_factor=8)
    monkeypatch.setattr(memory, "free_memory", lambda device: 15e9)  # a T4, less the CUDA context
    flags = dict(height=512, width=512, prior_preservation=True)
    with pytest.raises(ConfigError, match=r"training on cuda: about 15\.\d GB .* 15\.0 GB is available on cuda: "
                                          r"add --gradient-checkpointing --optimizer adamw8bit, or pass --yes"):
        check_training_memory(sd15, "cuda", yes=False, **flags)
    assert "about 15.7 GB" in check_training_memory(sd15, "cuda", yes=True, **flags)
    assert "15.0 GB available" in check_training_memory(sd15, "cuda", yes=False, lora=True, **flags)


def test_the_benchmarks_folders_have_the_published_sizes():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import real_scale

    c = real_scale.configs("sd21", tiny=False)
    assert c["text"]["hidden_size"] == 1024 and c["unet"]["use_linear_projection"]
    assert c["scheduler"]["prediction_type"] == "v_prediction" and c["size"] == 768
