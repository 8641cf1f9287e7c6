"""Export a demo as a folder ready to upload as a Hugging Face Space (Gradio SDK):

    app.py            build_demo("model").launch(), with the limits it was exported with
    requirements.txt  difflab's dependencies, pinned to the versions it was exported with
    README.md         the Space's front matter (sdk: gradio, sdk_version) and how to run it locally
    model/            the model folder (diffusers format + difflab.json); for a model given by its Hub id,
                      no copy: app.py names the id and the Space downloads it when it starts
    difflab/          difflab's own source, vendored: difflab is not on PyPI, and next to app.py it
                      imports without being installed
    clip/             a local CLIP model, when one was given (a Hub id is fetched by the Space instead)
    loras/            the LoRAs of --lora, one folder each named as the picker names it (a Hub id: named)
    embeddings/       the textual inversion files of --embedding, with the tokens they were given

`python app.py` in the folder serves it locally.
"""

from __future__ import annotations

import platform
import shutil
from importlib import metadata
from pathlib import Path

import difflab
from difflab.app.demo import model_label
from difflab.app.loras import LoraMenu
from difflab.app.service import Limits, check_model
from difflab.errors import ConfigError
from difflab.layout import PICKLE_SUFFIXES, is_hub_id
from difflab.models.embeddings import embedding_file, load_embeddings, split_spec
from difflab.storage.folder import atomic_folder, load_model, resolve_model_folder

PROVIDED_BY_SPACE = {"gradio"}  # the Space installs gradio from README's sdk_version

APP = '''"""A difflab demo, exported as a Hugging Face Space. Run it here with `python app.py`."""

from pathlib import Path

from difflab.app import Limits, build_demo

here = Path(__file__).parent
limits = {limits}
build_demo({model}, {clip}{extras}limits=limits, title={title!r}).launch()
'''

README = """---
title: {space_title}
emoji: 🌀
colorFrom: indigo
colorTo: pink
sdk: gradio
sdk_version: {gradio_version}
python_version: "{python_version}"
app_file: app.py
pinned: false
license: apache-2.0
{models}---

# {title}

A Gradio demo of a difflab diffusion model, made with `difflab demo --export`: {description}.

{model_line}
- `difflab/`: difflab's source (it is not on PyPI); `app.py` imports it from here
- `requirements.txt`: the packages it needs, at the versions it was exported with (gradio comes from
  `sdk_version` above)

Run it on your own machine:

```bash
pip install -r requirements.txt gradio=={gradio_version}
python app.py        # then open http://127.0.0.1:7860
```

Limits: at most {limits.max_steps} steps, {limits.max_images} images and {limits.max_image_size} pixels a
side a request; requests queue (at most {limits.max_queue} waiting) and run one at a time.
"""


def export_space(model_spec, out: str | Path, *, clip_model: str | None = None, limits: Limits | None = None,
                 allow_pickle: bool = False, loras=(), embeddings=()) -> Path:
    """Write the Space folder `out` (a previous export there is replaced) and return it; `loras` and
    `embeddings` as build_demo takes them, copied in (each checked against the model first)."""
    limits = limits or Limits()
    menu = LoraMenu(loras, allow_pickle=allow_pickle)  # every LoRA found, before anything is copied
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "app.py").is_file())):
        raise ConfigError(f"{out} exists and is not an exported demo; choose a new folder for --export")
    hub_id = str(model_spec) if is_hub_id(str(model_spec)) else None
    source = resolve_model_folder(model_spec, allow_pickle)
    model = load_model(source, allow_pickle=allow_pickle)  # a model that cannot be served is refused here
    check_model(model, limits, model_spec)
    if menu:
        menu.load(model)  # a LoRA for another base is refused here, not when the Space starts
    load_embeddings(model, list(embeddings), allow_pickle=allow_pickle)  # each checked against the model
    name = model_label(model_spec)
    title = f"difflab · {name}"
    clip_arg = ""
    pipeline = model.kind.pipeline if model.prompts is not None else "DDPMPipeline"
    if hub_id is None:
        model_arg = 'here / "model"'
        model_line = (f'- `model/`: the model, a diffusers folder that also loads with '
                      f'`{pipeline}.from_pretrained("model")`')
    else:
        model_arg = repr(hub_id)
        model_line = (f"- the model: [{hub_id}](https://huggingface.co/{hub_id}), downloaded when the Space starts "
                      f'(it also loads with `{pipeline}.from_pretrained("{hub_id}")`)')
    with atomic_folder(out) as partial:
        pickles = [] if allow_pickle else [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
        skip = shutil.ignore_patterns(".*", "__pycache__", *pickles)
        if hub_id is None:
            shutil.copytree(source, partial / "model", ignore=skip)
        shutil.copytree(Path(difflab.__file__).parent, partial / "difflab",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if clip_model:
            if Path(clip_model).expanduser().is_dir():
                shutil.copytree(Path(clip_model).expanduser(), partial / "clip", ignore=skip)
                clip_arg = 'clip_model=str(here / "clip"), '
            else:
                clip_arg = f"clip_model={str(clip_model)!r}, "
        extras = copy_loras(menu, partial) + copy_embeddings(embeddings, partial, allow_pickle)
        (partial / "app.py").write_text(APP.format(model=model_arg, clip=clip_arg, extras=extras, limits=limits,
                                                   title=title), encoding="utf-8")
        (partial / "requirements.txt").write_text(requirements(), encoding="utf-8")
        from difflab.app.demo import describe

        (partial / "README.md").write_text(README.format(
            space_title=title[:60], title=title, description=describe(model).rstrip("."), limits=limits,
            model_line=model_line, models=f"models:\n  - {hub_id}\n" if hub_id else "",
            gradio_version=installed_version("gradio") or "6.31.0",
            python_version=".".join(platform.python_version_tuple()[:2]),
        ), encoding="utf-8")
    return out


def copy_loras(menu, partial: Path) -> str:
    """Each LoRA file into loras/LABEL/, under its own file name, so that the Space's picker names it as
    this one does; a Hub LoRA stays named by its id. The app.py argument, or nothing."""
    specs = []
    for label, source in menu.sources.items():
        if source.file is None:
            specs.append(repr(source.repo_id))
            continue
        specs.append(vendor(Path(source.file), partial, "loras", label.replace("/", "_")))
    return f"loras=[{', '.join(specs)}], " if specs else ""


def copy_embeddings(embeddings, partial: Path, allow_pickle: bool) -> str:
    """Each embedding file into embeddings/, with the token it was given. The app.py argument, or nothing."""
    specs = []
    for index, spec in enumerate(embeddings):
        path, token = split_spec(spec)
        file = vendor(embedding_file(path, allow_pickle), partial, "embeddings", str(index))  # two of one name apart
        specs.append(file + (f" + {':' + token!r}" if token else ""))
    return f"embeddings=[{', '.join(specs)}], " if specs else ""


def vendor(file: Path, partial: Path, kind: str, folder: str) -> str:
    """`file` copied into KIND/FOLDER/ under its own name; app.py's expression for its path there."""
    (partial / kind / folder).mkdir(parents=True)
    shutil.copy2(file, partial / kind / folder / file.name)
    return f"str(here / {kind!r} / {folder!r} / {file.name!r})"


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name).split("+")[0]  # 2.13.0+cpu -> 2.13.0: the Space picks its own build
    except metadata.PackageNotFoundError:
        return None


def dependency_specs() -> list[str]:
    """difflab's run-time requirements: from its installed metadata, else from the pyproject.toml of
    the source tree it runs from."""
    try:
        specs = metadata.requires("difflab") or []
    except metadata.PackageNotFoundError:
        specs = []
    if not specs:
        import tomllib

        pyproject = Path(difflab.__file__).resolve().parents[2] / "pyproject.toml"
        if pyproject.is_file():
            specs = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    return [s for s in specs if "extra" not in s.partition(";")[2]]


def requirements() -> str:
    """requirements.txt: each dependency pinned to the version installed here (or as difflab asks)."""
    from packaging.requirements import Requirement

    lines = ["# difflab's dependencies, at the versions this demo was exported with."]
    for spec in dependency_specs():
        requirement = Requirement(spec)
        if requirement.name.lower() in PROVIDED_BY_SPACE:
            continue
        version = installed_version(requirement.name)
        lines.append(f"{requirement.name}=={version}" if version else str(requirement))
    return "\n".join(lines) + "\n"
