"""difflab push: what would be uploaded (upload_plan, no network), and real uploads through
huggingface_hub to a fake Hub this file serves on 127.0.0.1 (HF_ENDPOINT points at it)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from difflab.cli import main
from difflab.storage import hub
from difflab.storage.hub import HubError, card_links, front_matter, rename_model, upload_plan

GOOD_TOKEN = "hf_fake_write_token"


# ---- a fake Hub: the endpoints create_repo, repo_info, create_branch and upload_folder call ----------

class FakeHub:
    """Repos in memory. Every request is recorded; one the fake does not know is answered 404 and
    shows up in `unknown`, so a test sees if huggingface_hub starts calling something new."""

    def __init__(self):
        # (repo type, repo id) -> {"private", "sdk", "files": {branch: {path: bytes}}, "commits"}
        self.repos: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.validated: list[dict] = []
        self.refuse_metadata = ""  # what validate-yaml answers, to act as a Hub with stricter rules
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id, repo_type="model", branch="main") -> dict[str, bytes]:
        return self.repos[(repo_type, repo_id)]["files"][branch]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                self.route("GET")

            def do_POST(self):
                self.route("POST")

            def route(self, method: str):
                path = unquote(urlsplit(self.path).path)
                fake.requests.append((method, path))
                data = self.body() if method == "POST" else b""
                if self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                if (method, path) == ("POST", "/api/repos/create"):
                    return self.create(json.loads(data))
                if (method, path) == ("POST", "/api/validate-yaml"):
                    return self.validate(json.loads(data))
                found = re.fullmatch(r"/api/(model|space)s/([^/]+/[^/]+)(?:/(revision|preupload|commit|branch)/(.+))?",
                                     path)
                if not found or (found[1], found[2]) not in fake.repos:
                    fake.unknown.append((method, path))
                    return self.reply(404, {"error": "Repository not found"})
                repo = fake.repos[(found[1], found[2])]
                action, revision = found[3], found[4]
                if method == "GET" and action in (None, "revision"):
                    return self.reply(200, {"id": found[2], "private": repo["private"], "sha": "0" * 40,
                                            "siblings": [{"rfilename": f} for f in repo["files"]["main"]]})
                if method == "POST" and action == "branch":
                    repo["files"].setdefault(revision, dict(repo["files"]["main"]))
                    return self.reply(200, {})
                if method == "POST" and action == "preupload":
                    files = json.loads(data)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self.reply(200, {"files": modes})
                if method == "POST" and action == "commit":
                    if revision not in repo["files"]:
                        return self.reply(404, {"error": f"Revision not found: {revision}"})
                    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                    header = lines[0]["value"]
                    for line in lines[1:]:
                        assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
                        repo["files"][revision][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    repo["commits"].append(header["summary"])
                    return self.reply(200, {"commitUrl": f"{fake.url}/{found[2]}/commit/{'1' * 40}",
                                            "commitOid": "1" * 40, "pullRequestUrl": None})
                fake.unknown.append((method, path))
                return self.reply(404, {"error": "not found"})

            def create(self, payload):
                repo_type = payload.get("type") or "model"
                repo_id = f"{payload['organization'] or 'me'}/{payload['name']}"
                url = f"{fake.url}/{'spaces/' if repo_type == 'space' else ''}{repo_id}"
                if (repo_type, repo_id) in fake.repos:
                    return self.reply(409, {"error": "You already created this repo", "url": url})
                if payload["organization"] == "someone-else":
                    return self.reply(403, {"error": "You don't have the rights to create a repo under someone-else"})
                if repo_type == "space" and payload.get("sdk") not in hub.SPACE_SDKS:
                    return self.reply(400, {"error": "sdk is required for a Space"})
                fake.repos[(repo_type, repo_id)] = {"private": payload.get("visibility") == "private",
                                                    "sdk": payload.get("sdk"), "files": {"main": {}}, "commits": []}
                return self.reply(200, {"url": url})

            def validate(self, payload):
                """What the Hub checks of a card that difflab could get wrong."""
                fake.validated.append(payload)
                errors = []
                try:
                    metadata, _ = front_matter(payload["content"])
                    hub.check_metadata(metadata, payload["repoType"])
                except HubError as e:
                    errors.append({"message": str(e)})
                if fake.refuse_metadata:
                    errors.append({"message": fake.refuse_metadata})
                return self.reply(400 if errors else 200, {"errors": errors, "warnings": []})

        return Handler


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The fake Hub, huggingface_hub pointed at it and online, with a good token and no saved login."""
    from huggingface_hub import constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
        yield fake


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error: "), err
    return err[0]


# ---- folders to push -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_folder(trained_model) -> Path:
    return trained_model.parent


@pytest.fixture
def lora_folder(tmp_path) -> Path:
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / hub.LORA_WEIGHTS).write_bytes(b"\0" * 64)  # the plan and the upload never parse it
    (folder / "README.md").write_text(
        "---\nbase_model: stable-diffusion-v1-5/stable-diffusion-v1-5\nlicense: creativeml-openrail-m\n"
        "tags:\n- text-to-image\n- diffusers\n- lora\ninstance_prompt: a photo of sks dog\n---\n\n"
        "# LoRA: sks dog\n\n![dog](images/dog.png)\n", encoding="utf-8")
    (folder / "images").mkdir()
    (folder / "images" / "dog.png").write_bytes(b"png")
    return folder


@pytest.fixture(scope="module")
def space_folder(trained_model, tmp_path_factory) -> Path:
    from difflab.app.export import export_space

    return export_space(trained_model, tmp_path_factory.mktemp("export") / "space")


def local_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---- the plan: what would be uploaded --------------------------------------------------------------

def test_names_agree_with_the_modules_that_write_the_folders():
    from difflab import layout
    from difflab.training.run_folder import RunFolder

    run = RunFolder("r")
    assert (run.config.name, run.model.name, run.samples.name, run.loss_plot.name) == (
        layout.RUN_CONFIG, layout.RUN_MODEL, layout.RUN_SAMPLES, layout.RUN_LOSS_PLOT)


def test_run_folder_plan_is_its_model_and_the_grid_the_card_shows(run_folder, trained_model):
    plan = upload_plan(run_folder, "model", repo_id="me/tiny")
    assert (plan.kind, plan.repo_type, plan.space_sdk) == ("run", "model", None)
    grid = sorted((run_folder / "samples").glob("step_*.png"))[-1]
    expected = {path: trained_model / path for path in local_files(trained_model)}
    expected.update({f"samples/{grid.name}": grid, "loss.png": run_folder / "loss.png"})
    assert dict((path, local) for local, path in plan.files) == expected
    assert plan.paths == sorted(plan.paths)
    assert not any(p.startswith(("checkpoints", "config.toml", "metrics.csv")) for p in plan.paths)
    # Every relative link of the uploaded card resolves to an uploaded file.
    _, body = front_matter(plan.card)
    assert f"samples/{grid.name}" in card_links(body) and "loss.png" in card_links(body)
    assert set(card_links(body)) <= set(plan.paths)
    # The card names the model by its repo id, not by where it was trained.
    assert body.lstrip().startswith("# me/tiny\n")
    assert 'DDPMPipeline.from_pretrained("me/tiny")' in body and "--model me/tiny " in body
    assert str(trained_model) not in plan.card
    assert plan.notes == []


def test_card_metadata_is_what_the_hub_files_a_diffusers_model_by(run_folder, trained_model):
    from huggingface_hub import ModelCard

    plan = upload_plan(run_folder, "model", repo_id="me/tiny")
    card = ModelCard(plan.card)  # huggingface_hub's own parser of the front matter
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"difflab", "unconditional", "diffusion-models-class"} <= set(card.data.tags)
    assert card.data.base_model is None  # trained from scratch: no base model
    assert plan.metadata == card.data.to_dict()
    # The local card's metadata is kept as it was written; only the body is adapted for the Hub.
    assert front_matter((trained_model / "README.md").read_text())[0] == plan.metadata


def test_model_folder_plan_is_every_file(trained_model):
    plan = upload_plan(trained_model)
    assert plan.kind == "model"
    assert {path for _, path in plan.files} == local_files(trained_model)
    assert all(local == trained_model / path for local, path in plan.files)
    assert plan.total_bytes() > (trained_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    # Without a repo id the card keeps its names.
    assert front_matter(plan.card)[1] == front_matter((trained_model / "README.md").read_text())[1]


def test_base_model_from_a_hub_id_and_leftovers_left_out(trained_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    (model / ".README.md.partial").write_text("half a card")  # hidden leftovers of an interrupted write
    (model / "unet" / "__pycache__").mkdir()
    (model / "unet" / "__pycache__" / "x.pyc").write_bytes(b"")
    text = (model / "README.md").read_text()
    (model / "README.md").write_text(text.replace("library_name: diffusers\n",
                                                  "library_name: diffusers\nbase_model: google/ddpm-cifar10-32\n"))
    plan = upload_plan(model, repo_id="me/tuned")
    assert plan.metadata["base_model"] == "google/ddpm-cifar10-32"
    assert not any(p.startswith(".") or "__pycache__" in p for p in plan.paths)
    # A base model given by a local path is not a Hub id: left out of the uploaded card, and said so.
    (model / "README.md").write_text(text.replace("library_name: diffusers\n",
                                                  "library_name: diffusers\nbase_model: runs/flowers/model\n"))
    plan = upload_plan(model, repo_id="me/tuned")
    assert "base_model" not in plan.metadata and "base_model:" not in plan.card
    assert any("runs/flowers/model" in note for note in plan.notes)


def test_links_out_of_the_model_folder_are_uploaded_with_it(run_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run, ignore=shutil.ignore_patterns("checkpoints"))
    grid = sorted((run / "samples").glob("step_*.png"))[-1].name
    card = run / "model" / "README.md"
    card.write_text(card.read_text() + f"\n![grid](../samples/{grid})\n<img src=\"../loss.png\" width=200>\n"
                    "[scheduler](scheduler/scheduler_config.json) [docs](https://huggingface.co/docs) [up](#use)\n"
                    "![gone](../samples/step_999999.png)\n![secret](../../secret.txt) [env](../.env)\n")
    (tmp_path / "secret.txt").write_text("not for the Hub")
    (run / ".env").write_text("HF_TOKEN=hf_x")
    plan = upload_plan(run, repo_id="me/run")
    body = front_matter(plan.card)[1]
    assert f"![grid](samples/{grid})" in body and '<img src="loss.png" width=200>' in body
    assert "[scheduler](scheduler/scheduler_config.json)" in body and "(https://huggingface.co/docs)" in body
    assert "## Samples" not in body  # the card shows a grid already
    assert {f"samples/{grid}", "loss.png", "scheduler/scheduler_config.json"} <= set(plan.paths)
    assert [n for n in plan.notes if "step_999999.png" in n]  # a broken link is reported, not uploaded
    assert not any("999999" in p for p in plan.paths)
    # A card cannot make push upload files from outside the folder pushed, nor hidden ones.
    assert not any("secret" in p or "env" in p for p in plan.paths)
    assert [n for n in plan.notes if "../../secret.txt, a file outside the folder pushed" in n]
    assert [n for n in plan.notes if "../.env, a file hidden" in n]
    # The model folder of a run, pushed by itself, still takes the run's images its card links.
    plan = upload_plan(run / "model", repo_id="me/run")
    assert f"samples/{grid}" in plan.paths and f"![grid](samples/{grid})" in plan.card


def test_model_renamed_in_code_a_file_read_by_path_is_downloaded():
    body = ('# runs/pets/model\n\n```bash\ndifflab sample --model runs/pets/model -n 4\n```\n\n```python\n'
            'unet = UNet2DModel.from_pretrained("runs/pets/model", subfolder="unet")\n'
            '    table = load_file("runs/pets/model/conditioning.safetensors")["w"]\n'
            'other = "runs/pets/model2"\n```\n')
    renamed = rename_model(body, "runs/pets/model", "me/pets")
    assert renamed.startswith("# me/pets\n") and "--model me/pets -n 4" in renamed
    assert 'from_pretrained("me/pets", subfolder="unet")' in renamed
    assert ('    from huggingface_hub import hf_hub_download\n'
            '    table = load_file(hf_hub_download("me/pets", "conditioning.safetensors"))["w"]') in renamed
    assert '"runs/pets/model2"' in renamed  # another path that merely starts with the name is left alone


def test_lora_folder_plan(lora_folder, tmp_path):
    for leftover in ("checkpoint-500/optimizer.bin", "logs/dreambooth/events.out"):  # as diffusers' scripts leave
        (lora_folder / leftover).parent.mkdir(parents=True)
        (lora_folder / leftover).write_bytes(b"state")
    plan = upload_plan(lora_folder, "model", repo_id="me/sks-dog")
    assert (plan.kind, plan.repo_type) == ("lora", "model")
    assert set(plan.paths) == {hub.LORA_WEIGHTS, "README.md", "images/dog.png"}
    assert plan.notes == ["left out checkpoint-500/, logs/: training state, not part of the LoRA"]
    shutil.rmtree(lora_folder / "checkpoint-500")
    shutil.rmtree(lora_folder / "logs")
    plan = upload_plan(lora_folder, "model", repo_id="me/sks-dog")
    meta = plan.metadata
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["instance_prompt"] == "a photo of sks dog" and meta["license"] == "creativeml-openrail-m"
    assert meta["tags"] == ["text-to-image", "diffusers", "lora", "difflab"]  # kept, in order; difflab added
    assert plan.notes == []
    # A LoRA with a bare card: metadata added, and a note that the base model is unknown.
    (lora_folder / "README.md").write_text("# my LoRA\n")
    plan = upload_plan(lora_folder, "model", repo_id="me/sks-dog")
    assert plan.card.startswith("---\nlibrary_name: diffusers\n") and plan.card.endswith("# my LoRA\n")
    assert {"lora", "difflab"} <= set(plan.metadata["tags"]) and "base_model" not in plan.metadata
    assert any("base_model" in note for note in plan.notes)
    # A run whose model is a LoRA: a LoRA card too.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    shutil.copytree(lora_folder, run / "model")
    plan = upload_plan(run, "model", repo_id="me/sks-dog")
    assert plan.kind == "run" and "lora" in plan.metadata["tags"] and hub.LORA_WEIGHTS in plan.paths


def test_space_plan(space_folder):
    plan = upload_plan(space_folder, "space", repo_id="me/demo")
    assert (plan.kind, plan.repo_type, plan.space_sdk) == ("space", "space", "gradio")
    assert plan.card == (space_folder / "README.md").read_text()  # a Space's README goes up as written
    assert {"app.py", "README.md", "requirements.txt", "model/model_index.json",
            "difflab/__init__.py", "difflab/cli/push.py"} <= set(plan.paths)
    assert set(plan.paths) == {p for p in local_files(space_folder) if "__pycache__" not in p}
    assert plan.metadata["sdk"] == "gradio" and plan.metadata["app_file"] == "app.py"


def test_folders_that_are_not_what_was_asked(run_folder, trained_model, space_folder, tmp_path):
    with pytest.raises(HubError, match="push it with --space"):
        upload_plan(space_folder, "model")
    with pytest.raises(HubError, match="not an exported Space"):
        upload_plan(trained_model, "space")
    with pytest.raises(HubError, match="does not exist"):
        upload_plan(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(HubError, match="not a model folder, a run folder, a LoRA folder"):
        upload_plan(tmp_path / "notes")
    with pytest.raises(HubError, match="is a file"):
        upload_plan(tmp_path / "notes" / "a.txt")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_folder / "config.toml", unfinished)
    with pytest.raises(HubError, match=r"never trained a step \(no model/ yet\)"):
        upload_plan(unfinished)
    broken = tmp_path / "broken"
    shutil.copytree(trained_model, broken)
    (broken / "README.md").write_text("---\ntags: [unclosed\n---\n# x\n")
    with pytest.raises(HubError, match="not valid YAML"):
        upload_plan(broken)
    (broken / "README.md").write_text("---\ntags: 3\n---\n# x\n")
    with pytest.raises(HubError, match="tags must be a list"):
        upload_plan(broken)


def test_dry_run_prints_the_plan_without_a_token(run_folder, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["push", "--model", str(run_folder), "--repo-id", "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run_folder} -> model repo me/tiny: ")
    assert "  unet/diffusion_pytorch_model.safetensors  <-  " in out and "samples/step_" in out
    assert json.loads(out.split("card metadata: ")[1])["library_name"] == "diffusers"


# ---- no token, offline, bad ids: one line, exit 2 --------------------------------------------------

def test_offline_refused_in_one_line(run_folder, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as conftest sets it for every test
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert main(["push", "--model", str(run_folder), "--repo-id", "me/tiny"]) == 2
    assert "HF_HUB_OFFLINE is set" in error_line(capsys)


def test_no_token_says_how_to_log_in(run_folder, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["push", "--model", str(run_folder), "--repo-id", "me/tiny"]) == 2
    line = error_line(capsys)
    assert "not logged in" in line and "hf auth login" in line and "HF_TOKEN" in line


@pytest.mark.parametrize("repo_id", ["me/", "a/b/c", "me/bad name", "../x"])
def test_bad_repo_ids(run_folder, capsys, repo_id):
    assert main(["push", "--model", str(run_folder), "--repo-id", repo_id, "--dry-run"]) == 2
    assert "is not a Hub repo id" in error_line(capsys)


def test_not_a_model_one_line(tmp_path, capsys):
    assert main(["push", "--model", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "nothing to push" in error_line(capsys)


# ---- real uploads, to the fake Hub -----------------------------------------------------------------

def test_push_a_run_uploads_the_plan(fake_hub, run_folder, capsys):
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "me/tiny", "--private"]) == 0
    assert capsys.readouterr().out.strip() == f"{fake_hub.url}/me/tiny"
    assert fake_hub.unknown == []
    repo = fake_hub.repos[("model", "me/tiny")]
    assert repo["private"] is True
    plan = upload_plan(run_folder, "model", repo_id="me/tiny")
    uploaded = fake_hub.files("me/tiny")
    assert set(uploaded) == set(plan.paths)
    for local, path in plan.files:
        assert uploaded[path] == (plan.card.encode() if path == "README.md" else local.read_bytes()), path
    assert [v["repoType"] for v in fake_hub.validated] == ["model"]
    assert repo["commits"] == ["Upload run with difflab push"]

    # Again, to a branch and with a message: the repo exists (409 is fine), the branch is made.
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "me/tiny", "--revision", "v2",
                 "--commit-message", "retrained"]) == 0
    assert capsys.readouterr().out.strip() == f"{fake_hub.url}/me/tiny/tree/v2"
    assert set(fake_hub.files("me/tiny", branch="v2")) == set(plan.paths) and repo["commits"][-1] == "retrained"


def test_push_a_lora_and_a_space(fake_hub, lora_folder, space_folder, capsys):
    assert main(["-q", "push", "--model", str(lora_folder), "--repo-id", "me/sks-dog"]) == 0
    assert capsys.readouterr().out.strip() == f"{fake_hub.url}/me/sks-dog"
    assert set(fake_hub.files("me/sks-dog")) == {hub.LORA_WEIGHTS, "README.md", "images/dog.png"}
    card = fake_hub.files("me/sks-dog")["README.md"].decode()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"

    assert main(["-q", "push", "--model", str(space_folder), "--repo-id", "me/demo", "--space"]) == 0
    assert capsys.readouterr().out.strip() == f"{fake_hub.url}/spaces/me/demo"
    space = fake_hub.repos[("space", "me/demo")]
    assert space["sdk"] == "gradio" and space["private"] is False
    files = fake_hub.files("me/demo", "space")
    assert files["app.py"] == (space_folder / "app.py").read_bytes()
    assert files["README.md"] == (space_folder / "README.md").read_bytes()
    assert "model/unet/diffusion_pytorch_model.safetensors" in files and "difflab/cli/push.py" in files
    assert not any("__pycache__" in p for p in files)
    assert fake_hub.unknown == []


def test_hub_refusals_are_one_line(fake_hub, run_folder, capsys, monkeypatch):
    # An existing public repo is never made private behind the user's back, nor uploaded to.
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "me/open"]) == 0
    commits = list(fake_hub.repos[("model", "me/open")]["commits"])
    capsys.readouterr()
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "me/open", "--private"]) == 2
    assert "already exists and is public" in error_line(capsys)
    assert fake_hub.repos[("model", "me/open")]["commits"] == commits
    # A namespace the token cannot write to.
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "someone-else/tiny"]) == 2
    assert "no write access to someone-else/tiny (403" in error_line(capsys)
    # Metadata the Hub refuses: nothing is uploaded.
    fake_hub.refuse_metadata = "\"pipeline_tag\" must be one of [...]"
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "me/strict"]) == 2
    assert 'refused the card\'s metadata ("pipeline_tag" must be one of [...])' in error_line(capsys)
    assert fake_hub.files("me/strict") == {}
    fake_hub.refuse_metadata = ""
    # A token the Hub does not accept.
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "me/other"]) == 2
    line = error_line(capsys)
    assert "refused the token (401" in line and "hf auth login" in line


def test_network_failure_is_one_line(run_folder, capsys, monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert main(["-q", "push", "--model", str(run_folder), "--repo-id", "me/tiny"]) == 2
    line = error_line(capsys)
    assert f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}" in line and "connection" in line


def test_command_line_push_with_hf_endpoint_and_hf_token(run_folder, tmp_path):
    """The real command in a fresh process: HF_ENDPOINT and HF_TOKEN from the environment, as a user sets them."""
    with FakeHub() as fake:
        env = {**os.environ, "HF_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": GOOD_TOKEN,
               "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(hub.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-m", "difflab", "push", "--model", str(run_folder), "--repo-id",
                               "me/cli"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == f"{fake.url}/me/cli"
        assert "uploading" in done.stderr and "Traceback" not in done.stderr
        assert set(fake.files("me/cli")) == set(upload_plan(run_folder, repo_id="me/cli").paths)
        assert fake.unknown == []
