"""Checks the generating commands (sample, eval, scratch sample, noise) make before any work: one
call before the model is loaded, one after, so a mistake costs seconds, not an hour of sampling."""

from __future__ import annotations

from difflab.checks import check_columns
from difflab.files import check_output_file, check_output_folder

OUTPUT_FILES = {"out": ("--out", "out.png"), "json": ("--json", "result.json")}
OUTPUT_FOLDERS = {"out_dir": "--out-dir"}
INPUT_FILES = {"image": "image", "mask": "mask", "depth": "depth map", "prompt_file": "prompt file"}
# The flags that are fields of the generation request, named as they are there.
REQUEST_FLAGS = ("count", "sampler", "steps", "seed", "eta", "cfg_scale", "cfg_interval", "cfg_rescale", "width",
                 "height", "image", "mask", "depth",
                 "strength", "noise_level", "guidance_mode", "precision")


def check_flags(args) -> None:
    """From the flags alone: the request's numbers, grid columns, output paths that can be written."""
    if getattr(args, "columns", None) is not None and getattr(args, "count", None) is not None:
        check_columns(args.columns, args.count)
    for name, (flag, example) in OUTPUT_FILES.items():
        if getattr(args, name, None) is not None:
            check_output_file(getattr(args, name), flag, example)
    for name, flag in OUTPUT_FOLDERS.items():
        if getattr(args, name, None) is not None:
            check_output_folder(getattr(args, name), flag)
    check_request_flags(args)


def request_from_flags(args):
    """The `GenerationRequest` the flags describe, before the model is loaded (what each image is conditioned
    on, and guidance terms, are added once it is)."""
    from difflab.diffusion.request import GenerationRequest

    return GenerationRequest(**{name: getattr(args, name) for name in REQUEST_FLAGS
                                if getattr(args, name, None) is not None})


def check_request_flags(args) -> None:
    """The generation request's rules that need no model (`GenerationRequest.check_values`), an --out that
    names an image format, and no output that would replace an input."""
    from difflab.diffusion.request import check_outputs
    from difflab.images import image_format

    request_from_flags(args).check_values()
    if getattr(args, "out", None) is not None:
        image_format(args.out, "--out")
    inputs = {what: getattr(args, name, None) for name, what in INPUT_FILES.items()}
    outputs = [(flag, getattr(args, name)) for name, (flag, _) in OUTPUT_FILES.items()
               if getattr(args, name, None) is not None]
    out_dir = ("--out-dir", args.out_dir) if getattr(args, "out_dir", None) is not None else None
    check_outputs(outputs, inputs, out_dir, first_seed=getattr(args, "seed", 0) or 0)


def check_with_model(args, model, per_class: bool = True, prompts: int = 0) -> None:
    """With the model loaded: sampler steps its schedule can take, and a workload that fits the
    machine (and, unless --yes, an hour). `per_class`: a class-conditional model draws -n images per
    class (difflab sample), else -n in all (difflab eval); a text model draws -n per prompt."""
    from difflab.diffusion.samplers import check_sampler_steps
    from difflab.workload import check_workload

    count, guided = args.count, False
    classes = getattr(args, "classes", None)
    if model.prompts is not None:
        if per_class:
            count *= max(1, prompts)
        guided = args.cfg_scale != 1
    elif model.class_names or classes is not None:
        if per_class:
            count *= len(model.class_indices(classes or "all"))
        guided = args.cfg_scale != 1
    check_sampler_steps(args.steps, model.noise_schedule.config.num_train_timesteps, args.sampler)
    size = None
    if any(getattr(args, name, None) is not None for name in ("image", "width", "height")):
        from difflab.diffusion.planning import planned_size

        size = planned_size(model, getattr(args, "image", None), getattr(args, "width", None),
                            getattr(args, "height", None))
    check_workload(model, count, args.steps, args.batch_size, yes=getattr(args, "yes", False), sampler=args.sampler,
                   guided=guided, size=size, offload=getattr(args, "offload", False))
