"""Checks the generating commands (sample, eval, scratch sample, noise) make before any work: one
call before the model is loaded, one after, so a mistake costs seconds, not an hour of sampling."""

from __future__ import annotations

from difflab.checks import check_columns, check_finite, check_sampler_steps
from difflab.files import check_output_file, check_output_folder

OUTPUT_FILES = {"out": ("--out", "out.png"), "json": ("--json", "result.json")}
OUTPUT_FOLDERS = {"out_dir": "--out-dir"}


def check_flags(args) -> None:
    """From the flags alone: finite numbers, grid columns, output paths that can be written."""
    check_finite({"--cfg-scale": getattr(args, "cfg_scale", None), "--eta": getattr(args, "eta", None)})
    if getattr(args, "columns", None) is not None and getattr(args, "count", None) is not None:
        check_columns(args.columns, args.count)
    for name, (flag, example) in OUTPUT_FILES.items():
        if getattr(args, name, None) is not None:
            check_output_file(getattr(args, name), flag, example)
    for name, flag in OUTPUT_FOLDERS.items():
        if getattr(args, name, None) is not None:
            check_output_folder(getattr(args, name), flag)


def check_with_model(args, model, per_class: bool = True, prompts: int = 0) -> None:
    """With the model loaded: sampler steps its schedule can take, and a workload that fits the
    machine (and, unless --yes, an hour). `per_class`: a class-conditional model draws -n images per
    class (difflab sample), else -n in all (difflab eval); a text model draws -n per prompt."""
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
    check_workload(model, count, args.steps, args.batch_size, yes=getattr(args, "yes", False), sampler=args.sampler,
                   guided=guided, height=getattr(args, "height", None), width=getattr(args, "width", None),
                   offload=getattr(args, "offload", False))
