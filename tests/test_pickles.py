"""Pickles are code: loading a model never runs code hidden in its weights, and nothing in difflab
reads settings or data with an unpickler, YAML or eval."""

from __future__ import annotations

import ast
import contextlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.errors import ModelError
from difflab.storage.folder import load_model

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"


class Payload:
    """Unpickling this runs code: here, harmlessly, it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(folder: Path, name: str, marker: Path, via_torch: bool) -> Path:
    """Replace the model's safetensors weights with a malicious pickle named `name`."""
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
    for old in unet.glob("diffusion_pytorch_model.*"):
        if old.suffix != ".json":
            old.unlink()
    weights = {"conv_in.weight": Payload(marker)}
    path = unet / name
    if via_torch:
        torch.save(weights, path)  # the zip format torch.save writes
    else:
        with open(path, "wb") as f:
            pickle.dump(weights, f)  # a plain pickle, as older tools wrote
    return path


@pytest.mark.parametrize("via_torch", [False, True], ids=["pickle", "torch.save"])
@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.ckpt", "weights.pt"])
def test_a_malicious_pickle_never_runs(tmp_path, trained_model, capsys, name, via_torch):
    folder = Path(shutil.copytree(trained_model, tmp_path / "model"))
    marker = tmp_path / "pwned"
    path = plant(folder, name, marker, via_torch)
    with contextlib.suppress(Exception):  # the payload is live: a full unpickler runs it
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ModelError, match=rf"{name} is a pickle, and unpickling can run code hidden in it: convert it "
                                         r"to safetensors, or pass --allow-pickle to load it with "
                                         r"torch.load\(weights_only=True\)"):
        load_model(folder)
    with pytest.raises(ModelError, match=rf"{name} was refused: it (calls exec|holds more than tensors), which could "
                                         r"run code when unpickled"):
        load_model(folder, allow_pickle=True)
    code = main(["sample", "--model", str(folder), "--allow-pickle", "-n", "1", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "was refused" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "x.png").exists()


def test_a_pickle_disguised_as_safetensors_never_runs(tmp_path, trained_model):
    folder = Path(shutil.copytree(trained_model, tmp_path / "model"))
    marker = tmp_path / "pwned"
    with open(folder / "unet" / "diffusion_pytorch_model.safetensors", "wb") as f:
        pickle.dump({"conv_in.weight": Payload(marker)}, f)
    for allow_pickle in (False, True):
        with pytest.raises(ModelError, match="diffusion_pytorch_model.safetensors is damaged: it is not a complete "
                           "safetensors file"):
            load_model(folder, allow_pickle=allow_pickle)
    assert not marker.exists()


def test_plain_tensors_in_a_pickle_load_with_the_opt_in(tmp_path, trained_model):
    folder = Path(shutil.copytree(trained_model, tmp_path / "model"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    weights.unlink()
    torch.save({"state_dict": state, "epoch": 3}, folder / "unet" / "last.ckpt")  # a training checkpoint's shape
    model = load_model(folder, allow_pickle=True)
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in state.items())


# ---- nothing reads code as data ---------------------------------------------------------------------------

UNSAFE_MODULES = {"yaml", "pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def unsafe_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES - {"pickle"}]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = f"{node.value.id}.{node.attr}"
            if node.value.id in UNSAFE_MODULES and name != "pickle.UnpicklingError":
                found.append(name)  # pickle is imported only to catch the error weights_only loading raises
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and name in UNSAFE_CALLS:  # not model.eval()
                found.append(f"{name}()")
            elif name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append("torch.load without weights_only=True")
            elif name == "load" and getattr(getattr(func, "value", None), "id", "") in ("np", "numpy"):
                if "allow_pickle" in keywords:
                    found.append("numpy.load(allow_pickle=...)")
            if "trust_remote_code" in keywords:
                found.append("trust_remote_code=")
    return found


def test_settings_and_data_are_read_as_data_only():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(SRC)): unsafe_uses(ast.parse(f.read_text(encoding="utf-8"))) for f in files}
    assert {f: uses for f, uses in found.items() if uses} == {}
    # the check itself catches what it looks for
    planted = "import yaml\nyaml.safe_load(s)\ntorch.load(p)\neval(s)\nload_dataset(x, trust_remote_code=True)"
    assert sorted(unsafe_uses(ast.parse(planted))) == sorted([
        "import yaml", "yaml.safe_load", "torch.load without weights_only=True", "eval()", "trust_remote_code="])
