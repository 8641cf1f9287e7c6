"""Sharing on the Hugging Face Hub: what `difflab push` uploads, and the upload.

`upload_plan(folder, kind)` decides, without the network, exactly what a push sends: each local
file and its path in the repo, the repo type, and the model card (README.md) as it will read on the
Hub, with its YAML metadata. `push(plan, repo_id)` then creates the repo (if needed) and uploads the
plan through `huggingface_hub` (`create_repo(exist_ok=True)` + `upload_folder`).

What a folder is, and what goes up:

    run folder     config.toml + model/    model/'s files at the repo's root, plus the images its card
                                           links (sample grids, the loss curve); the card gets a
                                           "Samples" section with the last grid if it links none
    model folder   model_index.json, a     every file (not hidden ones, not __pycache__)
                   bare UNet, or scratch.json
    LoRA folder    pytorch_lora_weights.safetensors + README.md: every file
    Space          app.py + README.md whose front matter names an `sdk` (`difflab demo --export`):
                   every file, as a Space repo

The uploaded card names the model by its repo id where the local card named it by its path
(`from_pretrained("runs/pets/model")` becomes `from_pretrained("USER/NAME")`), and its relative
links point at files that are uploaded with it.

This module does not import torch: a push is a file upload.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from difflab.errors import DifflabError
from difflab.layout import (
    CARD,
    INFO_FILE,
    LORA_WEIGHTS,
    MODEL_FOLDERS,
    MODEL_INDEX,
    RUN_LOSS_PLOT,
    RUN_MODEL,
    RUN_SAMPLES,
    SCRATCH_INFO_FILE,
    Kind,
    is_hub_id,
    json_or_empty,
    run_of,
    unfinished_run,
    what_is_at,
)

log = logging.getLogger("difflab")


SPACE_SDKS = ("gradio", "streamlit", "docker", "static")
# pipeline_tag by the diffusers pipeline class a model_index.json names
PIPELINE_TAGS = {
    "DDPMPipeline": "unconditional-image-generation",
    "DDIMPipeline": "unconditional-image-generation",
    "StableDiffusionPipeline": "text-to-image",
    "StableDiffusionXLPipeline": "text-to-image",
    "StableDiffusionImg2ImgPipeline": "image-to-image",
    "StableDiffusionInpaintPipeline": "image-to-image",
    "StableDiffusionDepth2ImgPipeline": "image-to-image",
    "StableDiffusionUpscalePipeline": "image-to-image",
}


class HubError(DifflabError):
    """A folder that cannot be pushed, or a push the Hub (or the network) refused."""


@dataclass
class UploadPlan:
    """Exactly what a push uploads."""

    folder: Path  # the folder the user named
    kind: str  # "run", "model", "lora" or "space"
    repo_type: str  # "model" or "space"
    files: list[tuple[Path, str]]  # (local file, path in the repo), sorted by path in the repo
    card: str  # README.md as uploaded (it replaces the local README.md's text)
    metadata: dict  # the card's YAML front matter
    space_sdk: str | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know (a link that will not resolve)

    @property
    def paths(self) -> list[str]:
        return [path for _, path in self.files]

    def total_bytes(self) -> int:
        return sum(local.stat().st_size for local, path in self.files if path != CARD) + len(self.card.encode())


# ---- what a folder is ------------------------------------------------------------------------------

def folder_kind(folder: Path) -> str:
    """"run", "model", "lora" or "space"; a HubError for anything else."""
    if not folder.exists():
        raise HubError(f"{folder} does not exist; give a model folder, a run folder, a LoRA folder or a Space "
                       "folder (difflab demo --export)")
    if not folder.is_dir():
        raise HubError(f"{folder} is a file; give the folder that holds it")
    found = what_is_at(folder)
    if found is Kind.UNFINISHED_RUN:
        raise HubError(unfinished_run(folder, ", so there is nothing to push yet"))
    if found in (Kind.RUN, Kind.LORA_RUN):
        return "run"
    if (folder / "app.py").is_file() and "sdk" in front_matter(_read_card(folder))[0]:
        return "space"
    if found is Kind.LORA_FOLDER:
        return "lora"
    if found in MODEL_FOLDERS:
        return "model"
    raise HubError(f"{folder} is not a model folder, a run folder, a LoRA folder ({LORA_WEIGHTS}) or an exported "
                   "Space (app.py + README.md with Space metadata); nothing to push")


def _read_card(folder: Path) -> str:
    try:
        return (folder / CARD).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise HubError(f"cannot read {folder / CARD} ({e})") from None


# ---- the card's metadata ---------------------------------------------------------------------------

def front_matter(card: str) -> tuple[dict, str]:
    """The card's YAML metadata and its body, read by huggingface_hub as the Hub reads them. A card
    without front matter has {}; front matter that is not a YAML mapping is a HubError (the Hub would
    refuse it)."""
    from huggingface_hub import RepoCard

    if not card.lstrip().startswith("---"):
        return {}, card
    try:
        parsed = RepoCard(card, ignore_metadata_errors=False)
    except Exception as e:  # yaml's errors (difflab itself does not import yaml), or "should be a dict"
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        if "should be a dict" in reason:
            raise HubError("the model card's front matter should be a YAML mapping (key: value lines); "
                           "fix README.md") from None
        raise HubError(f"the model card's front matter is not valid YAML ({reason}); fix README.md") from None
    return parsed.data.to_dict(), parsed.text


def with_front_matter(metadata: dict, body: str) -> str:
    from huggingface_hub import CardData

    return f"---\n{CardData(**metadata).to_yaml()}\n---\n{body if body.startswith(chr(10)) else chr(10) + body}"


def check_metadata(metadata: dict, repo_type: str = "model") -> None:
    """The rules of the Hub's metadata that a card difflab uploads could break; a HubError names the field."""
    def fail(what: str):
        raise HubError(f"the card's metadata is not valid for the Hub: {what}; fix README.md's front matter")

    tags = metadata.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        fail("tags must be a list of words")
    for key in ("library_name", "pipeline_tag", "license"):
        if key in metadata and not isinstance(metadata[key], str):
            fail(f"{key} must be a string")
    if "base_model" in metadata:
        base = metadata["base_model"]
        if not all(is_hub_id(b) for b in (base if isinstance(base, list) else [base])):
            fail(f"base_model must be a Hub id (owner/name), not {base!r}")
    if repo_type == "space" and metadata.get("sdk") not in SPACE_SDKS:
        fail(f"sdk must be one of {', '.join(SPACE_SDKS)}")


def _model_metadata(model: Path, metadata: dict, notes: list[str]) -> dict:
    """The card's metadata, completed with what the Hub needs to file the model right."""
    metadata = dict(metadata)
    lora = (model / LORA_WEIGHTS).is_file()
    info = json_or_empty(model / INFO_FILE)
    index = json_or_empty(model / MODEL_INDEX)
    scratch = (model / SCRATCH_INFO_FILE).is_file()
    if not scratch:
        metadata.setdefault("library_name", "diffusers")
    tag = PIPELINE_TAGS.get(index.get("_class_name"))
    if lora:
        tag = tag or "text-to-image"
    elif scratch:
        tag = "unconditional-image-generation"
    if tag:
        metadata.setdefault("pipeline_tag", tag)
    tags = metadata.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    wanted = ["difflab"] + (["lora"] if lora else []) + (["diffusion-models-class", "pytorch"]
                                                                   if scratch else [])
    metadata["tags"] = tags + [t for t in wanted if t not in tags]
    base = metadata.get("base_model")
    if base is None and is_hub_id(info.get("base_model")):
        metadata["base_model"] = info["base_model"]
    elif base is not None and not all(is_hub_id(b) for b in (base if isinstance(base, list) else [base])):
        del metadata["base_model"]  # a local path: the Hub takes only Hub ids there
        notes.append(f"base_model {base!r} is not a Hub id, so the uploaded card leaves it out")
    if lora and "base_model" not in metadata:
        notes.append("the LoRA's card names no base_model: add 'base_model: OWNER/NAME' to README.md's front "
                     "matter so that the Hub links the LoRA to the model it adapts")
    return metadata



# ---- the card's body -------------------------------------------------------------------------------

LINK = re.compile(r"(!?\[[^\]]*\]\()(<[^>]*>|[^)\s]+)((?:\s+\"[^\"]*\")?\))|(<img\b[^>]*?\bsrc=[\"'])([^\"']+)([\"'])")


def card_links(body: str) -> list[str]:
    """Relative targets of the card's Markdown links and <img src=...> (not URLs, not #anchors)."""
    targets = []
    for m in LINK.finditer(body):
        target = (m[2] or m[5] or "").strip("<>")
        if target and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", target):
            targets.append(target)
    return targets


def rewrite_links(body: str, mapping: dict[str, str]) -> str:
    def replace(m: re.Match) -> str:
        if m[1] is not None:
            target = m[2].strip("<>")
            return m[1] + mapping.get(target, m[2]) + m[3] if target in mapping else m[0]
        target = m[5]
        return m[4] + mapping.get(target, target) + m[6]
    return LINK.sub(replace, body)


def rename_model(body: str, local_name: str, repo_id: str) -> str:
    """The card's code names the model by its local path; on the Hub, the repo id names it. A file of
    the model read by path ("NAME/file") is fetched with hf_hub_download instead."""
    if not local_name or local_name == repo_id:
        return body
    name = re.escape(local_name)
    body = re.sub(rf"^# {name}[ \t]*$", f"# {repo_id}", body, flags=re.M)
    body = re.sub(rf"--model {name}(?=\s)", f"--model {repo_id}", body)
    lines = []
    for line in body.split("\n"):
        new = re.sub(rf"([\"']){name}/([^\"']+)\1", lambda m: f'hf_hub_download("{repo_id}", "{m[2]}")', line)
        if new != line:
            indent = re.match(r"\s*", line)[0]
            lines.append(f"{indent}from huggingface_hub import hf_hub_download")
        lines.append(re.sub(rf"([\"']){name}\1", lambda m: f'"{repo_id}"', new))
    return "\n".join(lines)


def _local_name(body: str, model: Path) -> str | None:
    """The path the card names the model by (its first heading), if that path is this model folder."""
    found = re.search(r"^# (\S+)[ \t]*$", body, flags=re.M)
    if not found:
        return None
    name = found[1]
    here = model.resolve().as_posix()
    try:
        same = Path(name).expanduser().resolve() == model.resolve()
    except (OSError, RuntimeError):
        same = False
    tail = name.lstrip("./")
    if same or (("/" in tail or os.sep in tail) and here.endswith("/" + tail.replace(os.sep, "/"))):
        return name
    return None


# ---- the plan --------------------------------------------------------------------------------------

# What LoRA training scripts leave next to the weights: training state, not the model.
TRAINING_STATE = re.compile(r"^(checkpoints?|checkpoint-\d+|logs)$")


def _files_under(folder: Path, skip_training_state: bool = False) -> list[Path]:
    """Every file under `folder` a repo should get: not hidden ones (.partial leftovers, .git), not
    __pycache__ or compiled Python, and (`skip_training_state`) not the checkpoints and logs that
    training scripts leave in a LoRA's output folder."""
    found = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if _hidden(parts):
            continue
        if skip_training_state and len(parts) > 1 and TRAINING_STATE.match(parts[0]):
            continue
        if path.is_file():
            found.append(path)
    return found


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__pycache__" for p in parts) or parts[-1].endswith(".pyc")


def _posix(path: Path) -> str:
    return PurePosixPath(*path.parts).as_posix()


def upload_plan(folder: str | Path, kind: str = "model", repo_id: str | None = None) -> UploadPlan:
    """What pushing `folder` uploads: `kind` is "model" (a run, model or LoRA folder, to a model repo) or
    "space" (an exported Space, to a Space repo). With `repo_id`, the card names the model by it."""
    folder = Path(folder).expanduser()
    if kind not in ("model", "space"):
        raise ValueError(f"kind must be 'model' or 'space', not {kind!r}")
    found = folder_kind(folder)
    if kind == "space":
        if found != "space":
            raise HubError(f"{folder} is not an exported Space (app.py + README.md with Space metadata); write one "
                           "with 'difflab demo --model M --export DIR', or push a model without --space")
        return _space_plan(folder)
    if found == "space":
        raise HubError(f"{folder} is an exported Space; push it with --space")
    return _model_plan(folder, found, repo_id)


def _space_plan(folder: Path) -> UploadPlan:
    card = _read_card(folder)
    metadata, _ = front_matter(card)
    check_metadata(metadata, "space")
    files = [(path, _posix(path.relative_to(folder))) for path in _files_under(folder)]
    return UploadPlan(folder, "space", "space", files, card, metadata, space_sdk=metadata["sdk"])


def _model_plan(folder: Path, kind: str, repo_id: str | None) -> UploadPlan:
    model = folder / RUN_MODEL if kind == "run" else folder
    # Links of the card that leave the model folder may reach into its run folder, no further.
    in_run = kind == "model" and run_of(folder) is not None
    root = folder.parent if in_run else folder
    notes: list[str] = []
    lora = (model / LORA_WEIGHTS).is_file()
    files = {_posix(path.relative_to(model)): path for path in _files_under(model, skip_training_state=lora)}
    left_out = sorted(p.name for p in model.iterdir() if lora and p.is_dir() and TRAINING_STATE.match(p.name))
    if left_out:
        notes.append(f"left out {', '.join(n + '/' for n in left_out)}: training state, not part of the LoRA")
    text = _read_card(model)
    metadata, body = front_matter(text)
    if not text.strip():
        body = f"\n# {repo_id or folder.name}\n\nA diffusion model shared with difflab (`difflab push`).\n"
        notes.append(f"{model} has no README.md: the upload gets a short card; write one for people who find it")

    # The card's links: to files in the model folder (uploaded anyway), or beyond it (uploaded with it).
    mapping = {}
    for target in dict.fromkeys(card_links(body)):
        local = (model / target.split("#")[0]).resolve()
        if not local.is_file():
            notes.append(f"the card links {target}, which does not exist; that link will not resolve on the Hub")
            continue
        try:
            path = _posix(local.relative_to(model.resolve()))
        except ValueError:
            try:  # beyond the model folder, within the run: uploaded with it
                path = _posix(local.relative_to(root.resolve()))
            except ValueError:  # never a file from elsewhere on this machine, whatever a card says
                path = None
            if path is not None and not _hidden(PurePosixPath(path).parts):
                if path in files and files[path].resolve() != local:
                    path = f"assets/{path}"
                files[path] = local
        if path not in files:
            where = "outside the folder pushed" if path is None else "hidden"
            notes.append(f"the card links {target}, a file {where} that is not uploaded; that link will not "
                         "resolve on the Hub")
            continue
        if path != target:
            mapping[target] = path
    body = rewrite_links(body, mapping)

    if kind == "run":
        linked = {files[p].resolve() for p in files if p.startswith(f"{RUN_SAMPLES}/")}
        grids = sorted((folder / RUN_SAMPLES).glob("step_*.png"))
        if grids and not linked:
            grid = grids[-1]
            files[f"{RUN_SAMPLES}/{grid.name}"] = grid
            step = grid.stem.removeprefix("step_").lstrip("0") or "0"
            section = (f"\n## Samples\n\nThe run's last sample grid, after {step} training steps (fixed seeds):\n\n"
                       f"![samples at step {step}]({RUN_SAMPLES}/{grid.name})\n")
            if (folder / RUN_LOSS_PLOT).is_file() and RUN_LOSS_PLOT not in files:
                files[RUN_LOSS_PLOT] = folder / RUN_LOSS_PLOT
                section += f"\n![training loss]({RUN_LOSS_PLOT})\n"
            body = _insert_section(body, section)

    if repo_id:
        local_name = _local_name(body, model)
        if local_name:
            body = rename_model(body, local_name, repo_id)
    # The metadata as written (a base_model that is a local path is dropped below), then as uploaded.
    check_metadata({k: v for k, v in metadata.items() if k != "base_model"})
    metadata = _model_metadata(model, metadata, notes)
    check_metadata(metadata)
    card = with_front_matter(metadata, body)
    files[CARD] = model / CARD
    return UploadPlan(folder, kind, "model", sorted(((p, k) for k, p in files.items()), key=lambda f: f[1]),
                      card, metadata, notes=notes)


def _insert_section(body: str, section: str) -> str:
    """Before the card's first '## ' section after the opening table (its "Use"), else at the end."""
    found = re.search(r"^## ", body, flags=re.M)
    if not found:
        return body.rstrip("\n") + "\n" + section
    return body[:found.start()] + section.lstrip("\n") + "\n" + body[found.start():]


# ---- the upload ------------------------------------------------------------------------------------

@contextmanager
def staged(plan: UploadPlan) -> Iterator[Path]:
    """A temporary folder laid out as the repo will be: links to the plan's files (copies where links
    cannot be made) and the card as uploaded."""
    with tempfile.TemporaryDirectory(prefix="difflab-push-") as tmp:
        root = Path(tmp)
        for local, path in plan.files:
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if path == CARD:
                target.write_text(plan.card, encoding="utf-8")
                continue
            try:
                target.symlink_to(local.resolve())
            except OSError:
                shutil.copy2(local, target)
        if CARD not in plan.paths:
            (root / CARD).write_text(plan.card, encoding="utf-8")
        yield root


def hub_token() -> str:
    """The token of `hf auth login` or HF_TOKEN; a HubError that says how to get one, or that the Hub
    is off (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set, and a push needs the Hugging Face Hub: unset HF_HUB_OFFLINE "
                       "(or set it to 0) and try again")
    token = get_token()
    if not token:
        raise HubError("not logged in to the Hugging Face Hub: run 'hf auth login', or set HF_TOKEN to a token "
                       "with write access (https://huggingface.co/settings/tokens)")
    return token


def push(plan: UploadPlan, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Create the repo if needed, upload the plan, and return the repo's URL (on `revision`'s tree
    when one is given). Offline, without a token, or refused by the Hub: a one-line HubError."""
    from huggingface_hub import HfApi

    token = token or hub_token()
    api = HfApi(token=token)
    repo_type = plan.repo_type
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=True if private else None, exist_ok=True,
                              space_sdk=plan.space_sdk)
        repo_id = url.repo_id or repo_id
        if private and not getattr(api.repo_info(repo_id, repo_type=repo_type), "private", False):
            kind = " --repo-type space" if repo_type == "space" else ""
            raise HubError(f"{repo_id} already exists and is public; nothing was uploaded. Make it private first "
                           f"('hf repos settings {repo_id} --private{kind}'), or push without --private")
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        with staged(plan) as folder:
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision,
                              commit_message=commit_message or f"Upload {plan.kind} with difflab push")
    except HubError:
        raise
    except Exception as e:
        raise hub_error(e, repo_id, api.endpoint) from None
    return f"{url.rstrip('/')}/tree/{revision}" if revision else str(url)


def hub_error(error: Exception, repo_id: str, endpoint: str) -> Exception:
    """The one line a person needs, for what can go wrong between here and the Hub."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    def first_line(text) -> str:
        return str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""

    if isinstance(error, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set, and a push needs the Hugging Face Hub: unset it and try again")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        said = first_line(getattr(error, "server_message", None)) or first_line(error)
        if status == 401:
            return HubError(f"the Hugging Face Hub refused the token (401: {said}); log in again with "
                            "'hf auth login', or set HF_TOKEN to a token with write access")
        if status == 403:
            return HubError(f"no write access to {repo_id} (403: {said}); push to your own name or an "
                            "organisation you can write to, with a token that has write access")
        return HubError(f"the Hugging Face Hub refused the push to {repo_id} (HTTP {status}: {said})")
    if isinstance(error, ValueError) and "metadata" in str(error):
        said = "; ".join(line.strip("- ") for line in str(error).splitlines()[1:] if line.strip())
        return HubError(f"the Hub refused the card's metadata ({said or first_line(error)}); fix README.md's "
                        "front matter")
    module = type(error).__module__.split(".")[0]
    if isinstance(error, (ConnectionError, TimeoutError, OSError)) or module.startswith(("httpx", "httpcore")):
        reason = first_line(error) or type(error).__name__
        return HubError(f"cannot reach the Hugging Face Hub at {endpoint} ({reason}); check your connection "
                        "(and HF_ENDPOINT, if you set it), then push again")
    return error
