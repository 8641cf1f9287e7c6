"""The training side's memory features, each shown doing what it says on a tiny Stable Diffusion folder:
gradient checkpointing keeps fewer activations for the same gradients; 8-bit AdamW and Adafactor keep
smaller optimizer states; mixed precision holds the frozen networks in the half type (and fp16 on GPUs
older than Ampere); latents, prompt embeddings, class images and sample grids go in memory-sized batches;
a LoRA run's checkpoints hold the adapters only and resume bit-exactly."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from PIL import Image, ImageDraw

import tiny_sd
from difflab import batch_memory
from difflab.cli import main
from difflab.config import dreambooth_defaults
from difflab.devices import auto_precision
from difflab.errors import ConfigError
from difflab.storage.folder import load_model
from difflab.training import dreambooth as db
from difflab.training import memory_features
from difflab.training.checkpoints import find_latest
from difflab.training.trainer import Trainer

PROMPT, CLASS_PROMPT = "a sks star", "a star"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stars")
    for i in range(3):
        image = Image.new("RGB", (16, 16), "white")
        points = [(8 + 7 * math.cos(a), 8 + 7 * math.sin(a)) for a in (0.3 * i + k * 2.513 for k in range(5))]
        ImageDraw.Draw(image).polygon(points, fill=(40, 80, 220))
        image.save(folder / f"star_{i}.png")
    return folder


def config(base, instances, **changes):
    """A DreamBooth run with prior preservation on the tiny folder, exact arithmetic unless told."""
    c = dreambooth_defaults()
    c.model.base = str(base)
    d = c.dreambooth
    d.instance_data, d.instance_prompt, d.class_prompt = str(instances), PROMPT, CLASS_PROMPT
    d.prior_preservation, d.num_class_images = True, 4
    c.optim.precision, c.optim.lr = "no", 1e-3
    c.run.steps, c.run.sample_every, c.run.checkpoint_every, c.run.sample_steps, c.run.sample_count = 2, 0, 0, 2, 2
    c.run.log_every = 1
    for section, values in changes.items():
        setattr(c, section, dataclasses.replace(getattr(c, section), **values))
    return db.check_settings(c)


def trainer(base, instances, out, **changes) -> Trainer:
    return Trainer(config(base, instances, **changes), out, data=db.make_data)


def saved_bytes_and_gradients(t: Trainer) -> tuple[int, dict[str, torch.Tensor]]:
    """The bytes of activations the forward pass keeps for the backward pass, and the gradients it gives."""
    batch = t.batches.next_step()[0]
    x_t = t.model.noise_schedule.add_noise(batch.images, batch.noise, batch.timesteps)
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        prediction = t.synced_network(x_t, batch.timesteps, batch.conditioning, batch.token_ids)
    prediction.float().square().mean().backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, net in enumerate(t.model.modules()) for n, p in net.named_parameters()
             if p.grad is not None}
    return sum(kept), grads


# ---- gradient checkpointing ------------------------------------------------------------------------------

def test_gradient_checkpointing_keeps_fewer_activations_for_the_same_gradients(base, instances, tmp_path):
    model = {"train_text_encoder": True}
    plain = trainer(base, instances, tmp_path / "plain", model=model)
    kept_plain, grads_plain = saved_bytes_and_gradients(plain)
    checkpointed = trainer(base, instances, tmp_path / "ckpt", model=model, optim={"gradient_checkpointing": True})
    assert checkpointed.model.unet.is_gradient_checkpointing
    assert checkpointed.model.prompts.text_encoder.is_gradient_checkpointing
    assert not plain.model.unet.is_gradient_checkpointing
    kept, grads = saved_bytes_and_gradients(checkpointed)
    assert kept < 0.5 * kept_plain, (kept, kept_plain)
    assert grads.keys() == grads_plain.keys() and any(k.startswith("2.") for k in grads)  # the text encoder's too
    for k in grads:
        torch.testing.assert_close(grads[k], grads_plain[k], rtol=1e-4, atol=1e-6)


def test_a_model_without_checkpointing_is_refused_in_one_line():
    class Plain(torch.nn.Module):
        pass

    model = type("M", (), {"unet": Plain(), "prompts": None})()
    with pytest.raises(ConfigError, match="does not support it"):
        memory_features.enable_gradient_checkpointing(model, text_encoder=False)


# ---- optimizers ----------------------------------------------------------------------------------------

def state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("name,most", [("adamw8bit", 0.3), ("adafactor", 0.05)])
def test_smaller_optimizers_keep_smaller_states_and_still_descend(name, most):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    x, y = torch.randn(64, 256), torch.randn(64, 256)
    sizes, losses = {}, {}
    for choice in ("adamw", name):
        net = torch.nn.Linear(256, 256)
        net.load_state_dict(layer.state_dict())
        optimizer = memory_features.make_optimizer(choice, list(net.parameters()), 1e-3, 0.0)
        first = None
        for _ in range(5):
            loss = (net(x) - y).square().mean()
            first = first if first is not None else loss.item()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        sizes[choice], losses[choice] = state_bytes(optimizer), (first, loss.item())
    assert sizes[name] < most * sizes["adamw"], sizes
    assert losses[name][1] < losses[name][0]


def test_a_run_with_8bit_adam_resumes_bit_exactly(base, instances, tmp_path):
    whole = trainer(base, instances, tmp_path / "whole", optim={"optimizer": "adamw8bit"}, run={"steps": 4})
    whole.fit()
    assert any(v.dtype == torch.uint8 for s in whole.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    halves = tmp_path / "halves"
    trainer(base, instances, halves, optim={"optimizer": "adamw8bit"}, run={"steps": 2}).fit()
    resumed = Trainer(config(base, instances, optim={"optimizer": "adamw8bit"}, run={"steps": 4}), halves,
                      resume=True, data=db.make_data)
    resumed.fit()
    for a, b in zip(whole.model.unet.parameters(), resumed.model.unet.parameters()):
        assert torch.equal(a, b)


def test_8bit_adam_without_bitsandbytes_is_one_line_and_exit_2(base, instances, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as where it is not installed
    code = main(["-q", "dreambooth", "--model", str(base), "--instance-data", str(instances), "--instance-prompt",
                 PROMPT, "--out", str(tmp_path / "run"), "--steps", "1", "--optimizer", "adamw8bit"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pip install 'difflab[gpu]'" in err and len(err.splitlines()) == 1


# ---- precision ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability,expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                 ((9, 0), "bf16")])
def test_auto_precision_is_fp16_below_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a T4 answers True too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert auto_precision("cuda") == expected
    assert auto_precision("cuda:0") == expected


def test_mixed_precision_holds_a_lora_runs_frozen_networks_in_the_half_type(base, instances, tmp_path):
    t = trainer(base, instances, tmp_path / "run", optim={"precision": "bf16"}, model={"lora_rank": 2})
    vae, text, unet = t.model.codec.vae, t.model.prompts.text_encoder, t.model.unet
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in text.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}  # the adapters
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}  # the base
    assert t.batches.prompt_cache is not None and t.batches.prompt_cache.embeddings.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in memory_features.trained_state(unet).items()}
    t.config.run.sample_every = 1  # a grid under the run's autocast, from half frozen weights
    t.fit()
    assert any(not torch.equal(before[k], v) for k, v in memory_features.trained_state(unet).items())
    assert (tmp_path / "run" / "samples").is_dir() and any((tmp_path / "run" / "samples").iterdir())


def test_a_full_runs_frozen_networks_are_half_on_a_gpu_and_saved_as_they_were(base):
    """On a GPU the frozen VAE and text encoder are cast, and put back in full precision before the model is
    saved; on the CPU (where the full-precision copy would cost more than the half type saves) they stay."""
    model = load_model(base)
    model.codec.vae.requires_grad_(False)
    model.prompts.text_encoder.requires_grad_(False)
    given = {k: v.clone() for k, v in model.codec.vae.state_dict().items()}
    assert memory_features.hold_frozen_in_half(model, "fp16", keep_full=True, device=torch.device("cpu")) == {}
    assert {p.dtype for p in model.codec.vae.parameters()} == {torch.float32}
    kept = memory_features.hold_frozen_in_half(model, "fp16", keep_full=True, device=torch.device("cuda"))
    assert set(kept) == {"vae", "text_encoder"}
    assert {p.dtype for p in model.codec.vae.parameters()} == {torch.float16}
    assert {p.dtype for p in model.prompts.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}  # it trains
    memory_features.restore_full(model, kept)
    for k, v in model.codec.vae.state_dict().items():
        assert v.dtype == given[k].dtype and torch.equal(v, given[k])


def test_fp16_training_holds_the_frozen_networks_in_fp16_and_scales_the_loss_on_a_gpu(base, instances, tmp_path):
    """accelerate's GradScaler scales the loss on GPUs; on the CPU it runs fp16 autocast without one."""
    t = trainer(base, instances, tmp_path / "run", optim={"precision": "fp16"})
    assert t.accelerator.mixed_precision == "fp16"
    assert (t.accelerator.scaler is not None) == (t.accelerator.device.type == "cuda")
    half = torch.float16 if t.accelerator.device.type == "cuda" else torch.float32  # see the test above
    assert {p.dtype for p in t.model.codec.vae.parameters()} == {half}
    assert {p.dtype for p in t.model.unet.parameters()} == {torch.float32}
    t.fit()
    assert all(torch.isfinite(p).all() for p in t.model.unet.parameters())


# ---- work done once, in memory-sized batches ------------------------------------------------------------

def test_latents_prompts_class_images_and_grids_go_in_memory_sized_batches(base, instances, tmp_path, monkeypatch):
    per_image = batch_memory.VAE_DECODE_BYTES_PER_PIXEL * 16 * 16
    monkeypatch.setattr(batch_memory, "free_memory", lambda device: int(per_image * 2 / batch_memory.MEMORY_SHARE))
    seen = {"encode": [], "decode": []}
    vae_class = type(load_model(base).codec.vae)
    encode, decode = vae_class.encode, vae_class.decode

    def spy(name, method):
        def call(self, x, *a, **k):
            seen[name].append(x.shape[0])
            return method(self, x, *a, **k)
        return call

    monkeypatch.setattr(vae_class, "encode", spy("encode", encode))
    monkeypatch.setattr(vae_class, "decode", spy("decode", decode))
    small = trainer(base, instances, tmp_path / "small")
    assert seen["decode"] and max(seen["decode"]) <= 2  # class images: 4 made, 2 at a time
    images = small.stream.dataset.data.images
    distinct = len({image.numpy().tobytes() for image in images})  # identical images are encoded once
    assert len(images) == 8 and sum(seen["encode"]) == distinct and max(seen["encode"]) <= 3  # 3 at a time
    seen["decode"].clear()
    small.config.run.sample_count = 4
    small.validation_prompts = [PROMPT, CLASS_PROMPT]
    small.write_samples()
    assert seen["decode"] and max(seen["decode"]) <= 2
    monkeypatch.undo()
    large = trainer(base, instances, tmp_path / "large")  # the same class images, now in one batch
    torch.testing.assert_close(small.stream.dataset.mean, large.stream.dataset.mean, rtol=1e-5, atol=1e-5)


def test_a_frozen_text_encoders_embeddings_are_computed_once(base, instances, tmp_path, monkeypatch):
    t = trainer(base, instances, tmp_path / "run", model={"cond_dropout": 0.5})
    assert set(t.batches.prompt_cache.rows) == {PROMPT, CLASS_PROMPT, ""}
    calls = []
    text = t.model.prompts.text_encoder
    monkeypatch.setattr(text, "forward", lambda *a, **k: calls.append(1))
    batch = t.batches.next_step()[0]
    assert calls == []
    monkeypatch.undo()
    with torch.no_grad():
        direct = text(t.batches.captions.token_ids([PROMPT, CLASS_PROMPT, ""]))[0]
    torch.testing.assert_close(t.batches.prompt_cache([PROMPT, CLASS_PROMPT, ""]), direct)
    assert batch.conditioning.text.shape == (2, *direct.shape[1:])


# ---- a LoRA run's checkpoints --------------------------------------------------------------------------

def test_a_lora_runs_checkpoints_hold_only_what_trains_and_resume_bit_exactly(base, instances, tmp_path):
    from safetensors.torch import load_file

    lora = {"lora_rank": 2}
    whole = trainer(base, instances, tmp_path / "whole", model=lora, run={"steps": 4})
    whole.fit()
    out = tmp_path / "halves"
    half = trainer(base, instances, out, model=lora, run={"steps": 2})
    half.fit()
    checkpoint = find_latest(out / "checkpoints")
    model = load_file(str(checkpoint / "model.safetensors"))
    assert model and all("lora" in k for k in model)
    unet_bytes = sum(v.numel() * v.element_size() for v in half.model.unet.state_dict().values())
    files = sum(f.stat().st_size for f in checkpoint.iterdir())
    assert files < 0.5 * unet_bytes, (files, unet_bytes)
    resumed = Trainer(config(base, instances, model=lora, run={"steps": 4}), out, resume=True, data=db.make_data)
    resumed.fit()
    for (name, a), b in zip(whole.model.unet.named_parameters(), resumed.model.unet.parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_that_does_not_fit_the_adapters_is_refused():
    from difflab.errors import TrainingError

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)  # the frozen base; net[1] trains
    memory_features.load_trained_state(net, {"1.weight": torch.ones(2, 2), "1.bias": torch.ones(2)}, "model")
    assert torch.equal(net[1].weight, torch.ones(2, 2))
    for state in ({"1.weight": torch.ones(2, 2)}, {"1.weight": torch.ones(2, 2), "1.bias": torch.ones(2),
                                                   "2.weight": torch.ones(2)}):
        with pytest.raises(TrainingError, match="does not fit this run"):
            memory_features.load_trained_state(net, state, "model")


# ---- the real-scale benchmark's row, on a narrow SD 1.5 layout ---------------------------------------------

@pytest.mark.slow
def test_the_real_scale_training_benchmark_runs_a_row_on_a_narrow_model(tmp_path, monkeypatch):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "bench"))
    import real_scale
    import real_scale_train

    monkeypatch.setattr(real_scale, "CACHE", tmp_path)
    folder = real_scale.build("sd15", tiny=True)
    row = real_scale_train.run_row(folder, "unet+te+ckpt+8bit+half", "cpu", 1, size=64)
    shape = __import__("difflab.memory", fromlist=["ModelShape"]).ModelShape.of_folder(folder)
    assert row["trained_parameters"] == shape.unet + shape.text_encoder
    assert row["precision"] == "bf16" and len(row["step_s"]) == 1
    assert row["peak_gib"] > row["weights_gib"] > 0  # the step's gradients and state came on top of the weights
    # the benchmark skips rows by the very estimate the trainer makes before its first step
    before = real_scale_train.estimate_before(folder, "unet+te+ckpt+8bit+half", "cpu", size=64)
    assert before / 2**30 == pytest.approx(row["estimate_gib"], abs=0.001)
    estimate = real_scale_train.estimate_before
    assert estimate(folder, "unet", "cpu") > estimate(folder, "lora", "cpu")
