"""Member checkpoints: one safetensors file, JSON metadata, no pickle, one-line errors (--members).

Members here have random weights (``create_member``), which is instant and enough to check that a
round trip reproduces the logits bit for bit.
"""

import json
import os
import pickle
import stat

import pytest
import torch
import torch.nn.functional as F

from divfast.data import Member, load_member, load_members, save_member
from divfast.data.members import FORMAT, FORMAT_VERSION, create_member, read_member_info
from divfast.errors import DivfastError

MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.125)
PROVENANCE = {"dataset": "digits", "loss": "independent", "seed": 7, "nested": {"a": [1, 2]}}


@pytest.fixture(scope="module")
def member():
    torch.manual_seed(0)
    m = create_member("resnet10t", 10, (3, 32, 32), MEAN, STD, provenance=PROVENANCE)
    return m.eval()


@pytest.fixture(scope="module")
def saved(member, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("members") / "alpha.safetensors")
    save_member(member, path)
    return path


@pytest.fixture(scope="module")
def state(member):
    return {k: v.detach().contiguous() for k, v in member.model.state_dict().items()}


def _x(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _write(path, state, doc):
    """A safetensors file of ``state``; ``doc``: a dict (as JSON), a str (as is) or None (none)."""
    from safetensors.torch import save_file

    meta = None if doc is None else {"divfast": doc if isinstance(doc, str) else json.dumps(doc)}
    save_file(state, str(path), metadata=meta)
    return str(path)


def _assert_member_error(exc_info, path):
    msg = str(exc_info.value)
    assert "--members" in msg, msg
    assert str(path) in msg, msg
    assert "\n" not in msg.strip(), msg


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_logits_identical(member, saved):
    loaded = load_member(saved)
    assert isinstance(loaded, Member)
    assert not loaded.training and not any(mod.training for mod in loaded.modules())
    x = _x()
    with torch.no_grad():
        assert torch.equal(member(x), loaded(x))
    for (ka, va), (kb, vb) in zip(member.model.state_dict().items(),
                                  loaded.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_round_trip_metadata(member, saved):
    loaded = load_member(saved)
    info = loaded.info
    assert info.architecture == "resnet10t"
    assert info.num_classes == 10
    assert tuple(info.input_size) == (3, 32, 32)
    assert tuple(info.mean) == MEAN and tuple(info.std) == STD
    assert info.provenance == PROVENANCE
    assert info.model_kwargs == {}
    assert loaded.name == "alpha"  # the file name, so eval tables tell members apart
    assert torch.equal(loaded.mean.flatten(), torch.tensor(MEAN))
    assert torch.equal(loaded.std.flatten(), torch.tensor(STD))
    assert read_member_info(saved).to_json() == member.info.to_json()


def test_model_kwargs_round_trip(tmp_path):
    m = create_member("resnet10t", 3, model_kwargs={"drop_rate": 0.25}).eval()
    path = str(tmp_path / "kw.safetensors")
    save_member(m, path)
    loaded = load_member(path)
    assert loaded.info.model_kwargs == {"drop_rate": 0.25}
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))


def test_file_is_plain_safetensors(member, saved):
    from safetensors import safe_open

    with safe_open(saved, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        some = next(iter(sorted(keys)))
        assert torch.equal(f.get_tensor(some), member.model.state_dict()[some])
    assert keys == set(member.model.state_dict())
    doc = json.loads(meta["divfast"])
    assert doc["format"] == FORMAT == "divfast-member"
    assert doc["format_version"] == FORMAT_VERSION == 1
    assert doc["architecture"] == "resnet10t" and doc["num_classes"] == 10
    assert doc["input_size"] == [3, 32, 32]
    assert doc["mean"] == list(MEAN) and doc["std"] == list(STD)
    assert doc["provenance"] == PROVENANCE
    assert set(meta) == {"divfast"}


def test_loading_never_unpickles(member, saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a member checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_member(saved)
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(member(x), loaded(x))


def test_save_leaves_no_temp_files(member, tmp_path):
    path = tmp_path / "m.safetensors"
    save_member(member, str(path))
    save_member(member, str(path))  # overwriting is atomic too
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_save_creates_parent_directories(member, tmp_path):
    path = tmp_path / "a" / "b" / "m.safetensors"
    save_member(member, str(path))
    assert path.is_file()


def test_failed_save_keeps_previous_file(member, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "m.safetensors"
    save_member(member, str(path))
    before = path.read_bytes()

    def half_write(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_member(member, str(path))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_saved_file_has_default_permissions(member, tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.safetensors"
        save_member(member, str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- inputs ------------------------------------------------------------------------------------


def test_member_normalises_its_input(member):
    x = _x(3)
    with torch.no_grad():
        expected = member.model((x - torch.tensor(MEAN).view(1, 3, 1, 1))
                                / torch.tensor(STD).view(1, 3, 1, 1))
        assert torch.equal(member(x), expected)


def test_member_resizes_other_input_sizes(member):
    x = _x(3, size=40)
    with torch.no_grad():
        out = member(x)
        assert out.shape == (3, 10)
        resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False,
                                antialias=True)
        assert torch.allclose(out, member(resized), atol=1e-6)
        assert member(_x(2, size=17)).shape == (2, 10)


def test_load_member_device_and_eval_mode(saved):
    loaded = load_member(saved, device="cpu")
    assert next(loaded.parameters()).device == torch.device("cpu")
    assert loaded.mean.device == torch.device("cpu")
    assert not loaded.training


def test_num_parameters(member):
    assert member.num_parameters() == sum(p.numel() for p in member.model.parameters()) > 0


# --- bad checkpoints ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(DivfastError) as info:
        load_member(str(path))
    _assert_member_error(info, path)
    assert "does not exist" in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DivfastError) as info:
        load_member(str(tmp_path))
    _assert_member_error(info, tmp_path)
    assert "not a file" in str(info.value)


@pytest.mark.parametrize("content", [os.urandom(256), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"],
                         ids=["random", "empty", "truncated"])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(DivfastError) as info:
        load_member(str(path))
    _assert_member_error(info, path)


def test_pickle_checkpoint_is_rejected_not_unpickled(tmp_path, state, monkeypatch):
    path = tmp_path / "legacy.pt"
    torch.save(state, path)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(DivfastError) as info:
        load_member(str(path))
    _assert_member_error(info, path)


def test_safetensors_without_divfast_metadata(tmp_path, state):
    path = _write(tmp_path / "plain.safetensors", state, None)
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)
    assert "no divfast metadata" in str(info.value)


def _doc(member, **changes):
    doc = member.info.to_json()
    for k, v in changes.items():
        if v is _DROP:
            doc.pop(k)
        else:
            doc[k] = v
    return doc


_DROP = object()


@pytest.mark.parametrize("changes", [
    {"format": "something-else"},
    {"format_version": FORMAT_VERSION + 1},
    {"num_classes": _DROP},
    {"architecture": _DROP},
    {"num_classes": "ten"},
    {"input_size": 32},
    {"mean": None},
    {"mean": [0.5, 0.5]},
    {"std": [0.2, 0.0, 0.2]},
    {"input_size": [3, 0, 32]},
    {"input_size": [3, 32]},
    {"num_classes": 0},
    {"class_names": ["a", "b"]},
], ids=["format", "newer-version", "no-num-classes", "no-architecture", "num-classes-str",
        "input-size-int", "mean-null", "mean-2-channels", "std-zero", "input-size-zero",
        "input-size-2d", "num-classes-0", "class-names-count"])
def test_malformed_metadata_fields(tmp_path, state, member, changes):
    path = _write(tmp_path / "bad.safetensors", state, _doc(member, **changes))
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)
    assert "malformed" in str(info.value)


def test_metadata_not_json(tmp_path, state):
    path = _write(tmp_path / "bad.safetensors", state, "{not json")
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)
    assert "malformed" in str(info.value)


@pytest.mark.parametrize("doc", ["[1, 2]", "null", "\"divfast-member\""])
def test_metadata_json_not_an_object(tmp_path, state, doc):
    path = _write(tmp_path / "bad.safetensors", state, doc)
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)
    assert "malformed" in str(info.value)


def test_weights_of_another_architecture(tmp_path, member):
    other = create_member("resnet18", 10)
    state = {k: v.contiguous() for k, v in other.model.state_dict().items()}
    path = _write(tmp_path / "mismatch.safetensors", state, member.info.to_json())
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)
    assert "resnet10t" in str(info.value) and "do not fit" in str(info.value)


def test_weights_with_another_class_count(tmp_path, state, member):
    path = _write(tmp_path / "classes.safetensors", state, _doc(member, num_classes=5))
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)


def test_missing_tensor(tmp_path, state, member):
    partial = dict(state)
    partial.pop(sorted(partial)[0])
    path = _write(tmp_path / "partial.safetensors", partial, member.info.to_json())
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)


def test_unknown_architecture_in_metadata(tmp_path, state, member):
    path = _write(tmp_path / "arch.safetensors", state, _doc(member, architecture="no_such_net"))
    with pytest.raises(DivfastError) as info:
        load_member(path)
    _assert_member_error(info, path)


# --- several members ---------------------------------------------------------------------------


def test_load_members_keeps_order(tmp_path, member, saved):
    other = str(tmp_path / "beta.safetensors")
    save_member(member, other)
    members = load_members([other, saved])
    assert [m.name for m in members] == ["beta", "alpha"]


def test_load_members_class_count_mismatch(tmp_path, saved):
    five = str(tmp_path / "five.safetensors")
    save_member(create_member("resnet10t", 5), five)
    with pytest.raises(DivfastError) as info:
        load_members([saved, five])
    msg = str(info.value)
    assert "--members" in msg and five in msg and "5" in msg and "10" in msg


def test_load_members_empty():
    with pytest.raises(DivfastError, match="--members"):
        load_members([])


def test_load_members_reports_the_bad_one(tmp_path, saved):
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(DivfastError) as info:
        load_members([saved, missing])
    assert missing in str(info.value)


def test_create_member_unknown_architecture():
    with pytest.raises(DivfastError, match="no_such_net"):
        create_member("no_such_net", 10)


# --- timm:NAME, offline ------------------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty cache. huggingface_hub reads HF_HUB_OFFLINE and the cache paths at
    import, so the constants are patched as well as the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_timm_pretrained_offline_is_a_clear_error(offline_hub):
    with pytest.raises(DivfastError) as info:
        load_member("timm:resnet10t")
    msg = str(info.value)
    assert "--members" in msg and "timm:resnet10t" in msg
    assert "offline" in msg or "not available" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec", ["timm:no_such_net", "timm:"])
def test_timm_unknown_name(offline_hub, spec):
    with pytest.raises(DivfastError) as info:
        load_member(spec)
    assert "--members" in str(info.value) and "unknown timm model" in str(info.value)


def _cache_timm_weights(cache: str, arch: str, seed: int):
    """Lays out the Hugging Face cache the way a past download would have: refs/main -> snapshot."""
    import timm

    repo = timm.create_model(arch, pretrained=False).pretrained_cfg["hf_hub_id"]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    rev = "0" * 40
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(rev)
    os.makedirs(os.path.join(base, "snapshots", rev))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(base, "snapshots", rev, "model.safetensors"))
    return model


def test_timm_pretrained_from_the_local_cache(offline_hub, tmp_path):
    """timm:NAME uses cached pretrained weights without any network, with timm's input config."""
    ref = _cache_timm_weights(str(tmp_path / "hf" / "hub"), "resnet10t", seed=5)
    member = load_member("timm:resnet10t")
    for (k, a), b in zip(member.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert member.info.num_classes == 1000 and member.info.input_size == (3, 176, 176)
    assert member.info.provenance["source"].startswith("timm pretrained")


def test_timm_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    """Without HF_HUB_OFFLINE and without a cache, an unreachable hub is reported at once rather
    than after huggingface_hub's retries (the probe is what decides)."""
    import huggingface_hub.constants as hub

    import divfast.data.members as members_module

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(members_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DivfastError, match="unreachable"):
        load_member("timm:resnet10t")
