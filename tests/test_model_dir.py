"""MODEL_DIR: round trip, atomic replacement, and refusal of tampered or incomplete folders."""

from __future__ import annotations

import json

import pytest
import torch

from common.model_dir import ModelDirError, load_model_dir, save_model_dir
from common.planning import default_test_plans
from common.stunet import build_stunet_from_plans

FILES = {"model.safetensors", "plans.json", "info.json", "manifest.json"}


@pytest.fixture(scope="module")
def plans():
    return default_test_plans(patch_size=(16, 32, 32))


@pytest.fixture(scope="module")
def branches(plans):
    out = {}
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        out[name] = build_stunet_from_plans(plans, deep_supervision=True).state_dict()
    return out


@pytest.fixture
def saved(tmp_path, plans, branches):
    path = tmp_path / "model"
    save_model_dir(path, branches, plans, {"round": 3, "metrics": {"A": {"GED4": {"dice": 0.9}}}})
    return path


def test_round_trip(saved, plans, branches):
    assert {p.name for p in saved.iterdir()} == FILES
    bundle = load_model_dir(saved)
    assert bundle.plans == plans
    assert bundle.info["round"] == 3 and bundle.info["metrics"]["A"]["GED4"]["dice"] == 0.9
    assert set(bundle.branches) == {"a", "b"}
    for name in ("a", "b"):
        assert bundle.branches[name].keys() == branches[name].keys()
        for key, value in branches[name].items():
            assert torch.equal(bundle.branches[name][key], value), key
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    # safetensors keys are "<branch>.<param>"
    from safetensors import safe_open
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "a.seg_outputs.4.weight" in keys and "b.conv_blocks_context.0.0.conv1.weight" in keys


def test_build_nets_reproduce_the_saved_nets(saved, plans, branches):
    torch.set_num_threads(1)
    nets = load_model_dir(saved).build_nets(("a", "b"))
    assert len(nets) == 2 and not any(n.training for n in nets)
    assert not nets[0].deep_supervision
    x = torch.randn(1, 1, 16, 32, 32)
    for net, name in zip(nets, ("a", "b")):
        ref = build_stunet_from_plans(plans, deep_supervision=False)
        ref.load_state_dict(branches[name])
        with torch.no_grad():
            assert torch.equal(net(x), ref.eval()(x))
    only_b = load_model_dir(saved).build_nets(("b",))
    assert len(only_b) == 1
    with pytest.raises(ModelDirError, match="no branch 'c'"):
        load_model_dir(saved).build_nets(("c",))


def test_half_precision_is_stored_as_float32(tmp_path, plans, branches):
    half = {k: {p: t.half() if t.is_floating_point() else t for p, t in sd.items()} for k, sd in branches.items()}
    save_model_dir(tmp_path / "m", half, plans, {})
    loaded = load_model_dir(tmp_path / "m").branches["a"]
    assert all(t.dtype == torch.float32 for t in loaded.values())


@pytest.mark.parametrize("name", ["model.safetensors", "plans.json", "info.json"])
def test_one_changed_byte_is_refused(saved, name):
    file = saved / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=name.replace(".", r"\.")) as err:
        load_model_dir(saved)
    assert "SHA-256" in str(err.value)


def test_edited_manifest_is_refused(saved):
    file = saved / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["files"]["plans.json"]["sha256"] = "0" * 64
    file.write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="manifest.json"):
        load_model_dir(saved)


@pytest.mark.parametrize("name", sorted(FILES))
def test_missing_file_is_refused(saved, name):
    (saved / name).unlink()
    with pytest.raises(ModelDirError, match=name.replace(".", r"\.")):
        load_model_dir(saved)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ModelDirError, match="not a MODEL_DIR"):
        load_model_dir(tmp_path / "nowhere")


def test_replacing_an_existing_model_dir(saved, plans, branches):
    save_model_dir(saved, {"a": branches["a"]}, plans, {"round": 4})
    bundle = load_model_dir(saved)
    assert bundle.info == {"round": 4} and set(bundle.branches) == {"a"}
    assert [p.name for p in saved.parent.iterdir()] == ["model"]  # no temp or old folders left


def test_bad_input_writes_nothing(tmp_path, plans, branches):
    with pytest.raises(ValueError, match="info"):
        save_model_dir(tmp_path / "m", branches, plans, {"dice": float("nan")})
    with pytest.raises(ValueError, match="branch name"):
        save_model_dir(tmp_path / "m", {"a.b": branches["a"]}, plans, {})
    assert list(tmp_path.iterdir()) == []
