"""The logits cache: one pass per member and dataset, content addressed, atomic, checked on read.

Members have random weights (``create_member``); the data is the first 20 embedded test digits. A
fixture counts member loads and forward calls, so "a rerun costs no pass" is checked, not assumed.
"""

import errno
import hashlib
import json
import os
import shutil

import pytest
import torch
from torch.utils.data import Subset

import divfast.data.members as members_module
from divfast.data import digits_dataset, save_member
from divfast.data.members import create_member, load_member
from divfast.ensembles import LogitsCache, member_logits
from divfast.ensembles import cache as cache_module
from divfast.ensembles.cache import FORMAT, FORMAT_VERSION, dataset_description, file_sha256
from divfast.errors import DivfastError

N = 20


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two members with different weights, saved once; tests copy them where they need to."""
    folder = tmp_path_factory.mktemp("pool")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = str(folder / f"m{seed}.safetensors")
        save_member(create_member("resnet10t", 10, (3, 32, 32)), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data():
    return Subset(digits_dataset("test"), range(N))


@pytest.fixture
def desc():
    return dataset_description("clean", N)


@pytest.fixture
def member(pool, tmp_path):
    """A private copy of member 0 (tests edit, touch and replace it)."""
    path = str(tmp_path / "member.safetensors")
    shutil.copyfile(pool[0], path)
    return path


@pytest.fixture
def cache(tmp_path):
    return LogitsCache(tmp_path / "cache")


def _direct(path, data):
    """Logits of one forward over the whole subset, outside the cache."""
    loaded = load_member(path)  # the real loader, uncounted
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        return loaded(x)


def _entries(cache):
    return sorted(os.path.relpath(os.path.join(d, f), cache.root)
                  for d, _, files in os.walk(cache.root) for f in files)


# --- hits and misses ---------------------------------------------------------------------------


def test_miss_then_hit_costs_no_second_pass(member, data, desc, cache, passes):
    first = member_logits(member, data, desc, cache=cache, batch_size=8)
    assert passes == {"loads": 1, "forwards": 3}  # 20 images in batches of 8
    assert os.path.isfile(cache.entry_path(member, desc))
    second = member_logits(member, data, desc, cache=cache, batch_size=8)
    assert passes["loads"] == 1 and passes["forwards"] == 3
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # a rerun: a fresh process (no remembered digests) with a new cache object on the same root
    cache_module._DIGESTS.clear()
    third = member_logits(member, data, desc, cache=LogitsCache(cache.root))
    assert passes["loads"] == 1
    assert torch.equal(first[0], third[0])


def test_logits_equal_a_direct_forward(member, data, desc, cache):
    logits, target = member_logits(member, data, desc, cache=cache, batch_size=N)
    assert logits.dtype == torch.float32 and logits.shape == (N, 10)
    assert torch.equal(logits, _direct(member, data))
    assert target.dtype == torch.int64
    assert torch.equal(target, torch.tensor([int(data[i][1]) for i in range(N)]))
    hit, hit_target = cache.get(member, desc)
    assert torch.equal(hit, logits) and torch.equal(hit_target, target)


def test_no_cache_stores_nothing(member, data, desc, tmp_path, passes):
    before = sorted(os.listdir(tmp_path))
    logits, _ = member_logits(member, data, desc, batch_size=N)
    member_logits(member, data, desc, batch_size=N)
    assert passes["loads"] == 2
    assert torch.equal(logits, _direct(member, data))
    assert sorted(os.listdir(tmp_path)) == before


def test_members_run_in_eval_mode(member, data, desc, monkeypatch):
    real = members_module.load_member
    seen = []

    def train_mode_load(spec, device="cpu"):
        loaded = real(spec, device).train()  # member_logits must not trust the loader's mode
        loaded.register_forward_hook(lambda mod, *_: seen.append(
            (mod.training, torch.is_grad_enabled())))
        return loaded

    monkeypatch.setattr(members_module, "load_member", train_mode_load)
    member_logits(member, data, desc, batch_size=N)
    assert seen == [(False, False)]


# --- invalidation: content addressed -------------------------------------------------------------


def test_changed_bytes_at_the_same_path_miss(member, pool, data, desc, cache, passes):
    old = member_logits(member, data, desc, cache=cache)[0]
    old_entry = cache.entry_path(member, desc)
    torch.manual_seed(123)
    save_member(create_member("resnet10t", 10, (3, 32, 32)), member)  # same size, other weights
    assert cache.get(member, desc) is None
    new = member_logits(member, data, desc, cache=cache)[0]
    assert passes["loads"] == 2
    assert not torch.equal(old, new)
    assert cache.entry_path(member, desc) != old_entry and os.path.isfile(old_entry)
    shutil.copyfile(pool[0], member)  # the old bytes again: the old entry answers
    assert torch.equal(member_logits(member, data, desc, cache=cache)[0], old)
    assert passes["loads"] == 2


def test_touch_only_keeps_the_hit(member, data, desc, cache, passes):
    digest = cache.member_hash(member)
    member_logits(member, data, desc, cache=cache)
    st = os.stat(member)
    os.utime(member, ns=(st.st_atime_ns + 5 * 10**9, st.st_mtime_ns + 5 * 10**9))
    assert cache.member_hash(member) == digest
    member_logits(member, data, desc, cache=cache)
    assert passes["loads"] == 1


def test_same_bytes_at_another_path_hit(member, data, desc, cache, tmp_path, passes):
    logits = member_logits(member, data, desc, cache=cache)[0]
    other = str(tmp_path / "elsewhere" / "renamed.safetensors")
    os.makedirs(os.path.dirname(other))
    shutil.copyfile(member, other)
    assert cache.entry_path(other, desc) == cache.entry_path(member, desc)
    assert torch.equal(member_logits(other, data, desc, cache=cache)[0], logits)
    assert passes["loads"] == 1


def test_member_hash_is_the_sha256_of_the_bytes_and_is_remembered(member, cache, monkeypatch):
    with open(member, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    cache_module._DIGESTS.clear()
    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cache.member_hash(member) == expected
    assert file_sha256(member) == expected
    assert len(calls) == 1  # the second call found the digest by the file's stat signature


@pytest.mark.parametrize("field,value", [
    ("spec", "lines1.6"), ("seed", 1), ("image_size", 64), ("split", "train"),
    ("num_samples", N - 1), ("data", "DIR"),
])
def test_every_dataset_field_is_part_of_the_key(member, data, desc, cache, tmp_path, field, value):
    member_logits(member, data, desc, cache=cache)
    kwargs = {"spec": "clean", "num_samples": N}
    kwargs[field] = str(tmp_path) if value == "DIR" else value
    other = dataset_description(**kwargs)
    assert other != desc
    assert cache.entry_path(member, other) != cache.entry_path(member, desc)
    assert cache.get(member, other) is None
    assert cache.get(member, desc) is not None


def test_a_smaller_sample_is_a_miss_and_a_pass(member, data, desc, cache, passes):
    member_logits(member, data, desc, cache=cache)
    small = Subset(data, range(N - 1))
    logits = member_logits(member, small, dataset_description("clean", N - 1), cache=cache)[0]
    assert passes["loads"] == 2 and logits.shape == (N - 1, 10)


def test_the_spec_is_keyed_canonically(member, data, cache):
    a, b = dataset_description("lines-1.60", N), dataset_description("lines1.6", N)
    assert a == b and a["spec"] == "lines1.6"
    assert cache.entry_path(member, a) == cache.entry_path(member, b)
    assert dataset_description("clean", N, data=".")["data"] == os.path.realpath(".")


# --- bad files are misses, and are rewritten -----------------------------------------------------


def _fill(member, data, desc, cache):
    logits = member_logits(member, data, desc, cache=cache)[0]
    return logits, cache.entry_path(member, desc)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip_data_byte"])
def test_a_corrupt_entry_is_a_miss_and_is_rewritten(member, data, desc, cache, passes, damage):
    logits, path = _fill(member, data, desc, cache)
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        if damage == "truncate":
            f.write(blob[: len(blob) // 2])
        elif damage == "garbage":
            f.write(os.urandom(len(blob)))
        elif damage == "flip_data_byte":  # a valid file whose tensor bytes changed: the checksum
            f.write(blob[:-5] + bytes([blob[-5] ^ 0x01]) + blob[-4:])
    assert cache.get(member, desc) is None
    again = member_logits(member, data, desc, cache=cache)[0]
    assert passes["loads"] == 2
    assert torch.equal(again, logits)
    assert open(path, "rb").read() != b"" and cache.get(member, desc) is not None


def _rewrite(path, edit_doc=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        doc = json.loads(f.metadata()["divfast"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_doc:
        edit_doc(doc)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, path, metadata={"divfast": json.dumps(doc)})


def _set(key, value):
    return lambda doc: doc.__setitem__(key, value)


@pytest.mark.parametrize("edit_doc,edit_tensors", [
    (_set("member_sha256", "0" * 64), None),
    (_set("dataset_sha256", "0" * 64), None),
    (_set("format", "divfast-member"), None),
    (_set("format_version", FORMAT_VERSION + 1), None),
    (lambda doc: doc["dataset"].__setitem__("seed", 7), None),
    (_set("dtype", "float16"), None),
    (_set("num_classes", 11), None),
    (_set("content_sha256", "0" * 64), None),
    (None, lambda t: t.__setitem__("logits", t["logits"][:-1].contiguous())),
    (None, lambda t: t.__setitem__("target", t["target"].int())),
    (None, lambda t: t.__setitem__("extra", torch.zeros(1))),
    (lambda doc: doc.clear(), None),
])
def test_a_metadata_mismatch_is_a_miss(member, data, desc, cache, edit_doc, edit_tensors):
    _, path = _fill(member, data, desc, cache)
    assert cache.get(member, desc) is not None
    _rewrite(path, edit_doc, edit_tensors)
    assert cache.get(member, desc) is None


def test_an_entry_with_edited_logits_and_matching_checksum_is_still_checked_finite(
        member, data, desc, cache):
    _, path = _fill(member, data, desc, cache)

    def poison(tensors):
        tensors["logits"][0, 0] = float("nan")

    def fix_checksum(doc):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            doc["content_sha256"] = cache_module._tensor_digest(f.get_tensor("logits"),
                                                                f.get_tensor("target"))

    _rewrite(path, edit_tensors=poison)
    _rewrite(path, edit_doc=fix_checksum)
    assert cache.get(member, desc) is None


def test_the_entry_format(member, data, desc, cache):
    from safetensors import safe_open

    logits, path = _fill(member, data, desc, cache)
    member_sha = cache.member_hash(member)
    assert os.path.relpath(path, cache.root).split(os.sep)[0] == member_sha[:16]
    with safe_open(path, framework="pt") as f:
        doc = json.loads(f.metadata()["divfast"])
        assert set(f.keys()) == {"logits", "target"}
    assert doc["format"] == FORMAT and doc["format_version"] == FORMAT_VERSION
    assert doc["member_sha256"] == member_sha and doc["dataset"] == desc
    assert doc["dtype"] == "float32" and doc["num_classes"] == 10
    assert doc["architecture"] == "resnet10t" and doc["member_file"] == "member.safetensors"
    assert doc["created"].endswith("+00:00")
    with open(path, "rb") as f:
        head = f.read(9)  # safetensors: an 8-byte header length, then the JSON header (no pickle)
    assert head[8:9] == b"{"


# --- atomic writes -------------------------------------------------------------------------------


def _crashing_save(tensors, path, metadata=None):
    """Writes half a real file, then dies, as a killed process would mid-write."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    raise RuntimeError("simulated crash during the write")


def test_a_crash_mid_write_leaves_no_readable_entry(member, data, desc, cache, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        member_logits(member, data, desc, cache=cache)
    assert not os.path.exists(cache.entry_path(member, desc))
    assert _entries(cache) == []  # no temporary file left behind either
    assert cache.get(member, desc) is None


def test_a_crash_while_overwriting_keeps_the_old_entry(member, data, desc, cache, monkeypatch):
    import safetensors.torch

    logits, path = _fill(member, data, desc, cache)
    monkeypatch.setattr(safetensors.torch, "save_file", _crashing_save)
    with pytest.raises(RuntimeError):
        cache.put(member, desc, logits + 1, torch.zeros(N, dtype=torch.long))
    assert torch.equal(cache.get(member, desc)[0], logits)
    assert _entries(cache) == [os.path.relpath(path, cache.root)]


def test_a_full_disk_is_an_error_naming_the_cache_root(member, data, desc, cache, monkeypatch):
    import safetensors.torch

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DivfastError, match="root") as exc_info:
        member_logits(member, data, desc, cache=cache)
    assert "No space left" in str(exc_info.value)
    assert cache.get(member, desc) is None


# --- float16 storage -----------------------------------------------------------------------------


def test_float16_round_trip(member, data, desc, cache, passes):
    half, target = member_logits(member, data, desc, cache=cache, dtype=torch.float16,
                                 batch_size=N)
    assert half.dtype == torch.float16
    assert torch.equal(half, _direct(member, data).half())
    hit = member_logits(member, data, desc, cache=cache, dtype=torch.float16)
    assert passes["loads"] == 1 and torch.equal(hit[0], half) and torch.equal(hit[1], target)
    # a float16 entry does not pass for float32 logits: float32 asks for a pass, and replaces it
    assert cache.get(member, desc, dtype=torch.float32) is None
    full = member_logits(member, data, desc, cache=cache, dtype=torch.float32, batch_size=N)
    assert passes["loads"] == 2 and full[0].dtype == torch.float32
    assert cache.get(member, desc, dtype=torch.float32) is not None
    # ... and a float32 entry serves float16 as the same rounding a pass would give
    assert torch.equal(cache.get(member, desc, dtype=torch.float16)[0], half)
    assert passes["loads"] == 2


def test_float16_halves_the_logits_bytes(member, data, desc, tmp_path):
    sizes = {}
    for dtype in (torch.float32, torch.float16):
        cache = LogitsCache(tmp_path / str(dtype))
        member_logits(member, data, desc, cache=cache, dtype=dtype)
        sizes[dtype] = os.path.getsize(cache.entry_path(member, desc))
    assert sizes[torch.float32] - sizes[torch.float16] == N * 10 * 2


def test_float16_overflow_is_an_error(member, data, desc, cache, monkeypatch):
    real = members_module.load_member

    def scaled_load(spec, device="cpu"):
        loaded = real(spec, device)
        loaded.register_forward_hook(lambda mod, inp, out: out * 1e6)
        return loaded

    monkeypatch.setattr(members_module, "load_member", scaled_load)
    with pytest.raises(DivfastError, match="float16"):
        member_logits(member, data, desc, cache=cache, dtype=torch.float16)
    assert cache.get(member, desc, dtype=torch.float16) is None


# --- errors --------------------------------------------------------------------------------------


def test_a_missing_member_file_is_an_error(data, desc, cache, tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    for call in (lambda: member_logits(missing, data, desc, cache=cache),
                 lambda: member_logits(missing, data, desc),
                 lambda: cache.get(missing, desc),
                 lambda: cache.member_hash(missing)):
        with pytest.raises(DivfastError, match="member_path") as exc_info:
            call()
        assert missing in str(exc_info.value)
    with pytest.raises(DivfastError, match="member_path"):
        cache.member_hash(str(tmp_path))  # a directory
    with pytest.raises(DivfastError, match="member_path"):
        member_logits("timm:resnet10t", data, desc, cache=cache)  # no file to hash


def test_a_cache_root_that_is_a_file_is_an_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(DivfastError, match="root") as exc_info:
        LogitsCache(path)
    assert "not a directory" in str(exc_info.value)
    with pytest.raises(DivfastError, match="root"):
        LogitsCache(path / "below")  # cannot be created under a file


def test_an_unwritable_cache_root_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(root)
                        else real(p, mode))  # chmod cannot stop root, which runs CI containers
    with pytest.raises(DivfastError, match="root") as exc_info:
        LogitsCache(root)
    assert "writable" in str(exc_info.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="file modes do not bind root; the monkeypatched test above covers it")
def test_an_unwritable_cache_root_by_mode(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(DivfastError, match="root"):
            LogitsCache(root)
    finally:
        root.chmod(0o700)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, "float16", None])
def test_a_bad_dtype_is_an_error(member, data, desc, cache, dtype):
    with pytest.raises(DivfastError, match="dtype"):
        member_logits(member, data, desc, cache=cache, dtype=dtype)
    with pytest.raises(DivfastError, match="dtype"):
        cache.get(member, desc, dtype=dtype)


def test_put_checks_what_it_stores(member, desc, cache):
    target = torch.zeros(N, dtype=torch.long)
    with pytest.raises(DivfastError, match="logits"):
        cache.put(member, desc, torch.zeros(N, 10, dtype=torch.float64), target)
    with pytest.raises(DivfastError, match="logits"):
        cache.put(member, desc, torch.zeros(N, 9), target)  # the member predicts 10 classes
    with pytest.raises(DivfastError, match="logits"):
        cache.put(member, desc, torch.full((N, 10), float("inf")), target)
    with pytest.raises(DivfastError, match="target"):
        cache.put(member, desc, torch.zeros(N, 10), torch.zeros(N))
    assert _entries(cache) == []


@pytest.mark.parametrize("bad", [
    {"spec": "clean"},
    "clean",
    dict(spec="nonsense3", data="embedded", split="test", image_size=None, seed=0, num_samples=N),
    dict(spec="clean", data="relative/dir", split="test", image_size=None, seed=0, num_samples=N),
    dict(spec="clean", data="embedded", split="val", image_size=None, seed=0, num_samples=N),
    dict(spec="clean", data="embedded", split="test", image_size=0, seed=0, num_samples=N),
    dict(spec="clean", data="embedded", split="test", image_size=None, seed=0.5, num_samples=N),
    dict(spec="clean", data="embedded", split="test", image_size=None, seed=0, num_samples=0),
])
def test_a_malformed_description_is_an_error(member, cache, bad):
    with pytest.raises(DivfastError):
        cache.get(member, bad)


def test_a_dataset_of_another_length_is_an_error(member, data, cache):
    with pytest.raises(DivfastError, match="dataset_desc") as exc_info:
        member_logits(member, data, dataset_description("clean", N + 1), cache=cache)
    assert str(N) in str(exc_info.value)


def test_non_finite_logits_name_the_member_and_store_nothing(data, desc, cache, tmp_path):
    torch.manual_seed(0)
    broken = create_member("resnet10t", 10, (3, 32, 32))
    with torch.no_grad():
        broken.model.get_classifier().bias[3] = float("nan")
    path = str(tmp_path / "broken.safetensors")
    save_member(broken, path)
    with pytest.raises(DivfastError, match="NaN") as exc_info:
        member_logits(path, data, desc, cache=cache)
    assert path in str(exc_info.value)
    assert _entries(cache) == []


def test_bad_loop_options_are_errors(member, data, desc, cache):
    with pytest.raises(DivfastError, match="batch_size"):
        member_logits(member, data, desc, cache=cache, batch_size=0)
    with pytest.raises(DivfastError, match="num_workers"):
        member_logits(member, data, desc, cache=cache, num_workers=-1)
    with pytest.raises(DivfastError, match="cache"):
        member_logits(member, data, desc, cache=str(cache.root))


# --- pool_logits: one data pass for the whole pool ------------------------------------------------


class _CountingData(torch.utils.data.Dataset):
    """Counts how many images are read: a pass over the data reads each once."""

    def __init__(self, base):
        self.base, self.reads = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


def test_pool_logits_reads_the_data_once_for_every_missing_member(pool, data, desc, cache, passes):
    from divfast.ensembles.cache import pool_logits

    counting = _CountingData(data)
    logits, target = pool_logits(pool, counting, desc, cache=cache, batch_size=7)
    assert counting.reads == N  # one pass feeds both members
    assert logits.shape == (2, N, 10) and passes["loads"] == 2
    for i, path in enumerate(pool):
        torch.testing.assert_close(logits[i], _direct(path, data), rtol=1e-5, atol=1e-5)
        assert torch.equal(member_logits(path, data, desc, cache=cache)[0], logits[i])  # cached
    assert torch.equal(target, torch.tensor([int(data[i][1]) for i in range(N)]))
    counting.reads = 0
    again, _ = pool_logits(pool, counting, desc, cache=cache)
    assert counting.reads == 0 and torch.equal(again, logits)  # all hits: no pass at all


def test_pool_logits_runs_only_the_members_the_cache_lacks(pool, data, desc, cache, passes):
    from divfast.ensembles.cache import pool_logits

    first, _ = member_logits(pool[0], data, desc, cache=cache)
    loads = passes["loads"]
    logits, _ = pool_logits(pool, data, desc, cache=cache)
    assert passes["loads"] == loads + 1  # member 0 came from the cache
    assert torch.equal(logits[0], first)


def test_pool_logits_refuses_members_of_different_class_counts(pool, data, desc, tmp_path):
    from divfast.ensembles.cache import pool_logits

    other = str(tmp_path / "five.safetensors")
    save_member(create_member("resnet10t", 5, (3, 32, 32)), other)
    with pytest.raises(DivfastError, match=r"member_paths \(--members\).*different numbers of classes"):
        pool_logits([pool[0], other], data, desc)


# --- pool Gram entries (the sweep's attribution diversity) -----------------------------------------

SETTINGS = {"method": "saliency", "target": "label", "abs": True, "normalize": "none", "ddof": 0}


def _gram(k=2):
    g = torch.randn(k, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    return g @ g.T


def test_gram_round_trip_and_canonical_order(pool, member, desc, cache, tmp_path):
    third = str(tmp_path / "third.safetensors")
    torch.manual_seed(3)
    save_member(create_member("resnet10t", 10, (3, 32, 32)), third)
    paths = [pool[1], member, third]
    gram = _gram(3) + torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert cache.get_gram(paths, desc, SETTINGS) is None
    cache.put_gram(paths, desc, SETTINGS, gram, 40)
    got, n = cache.get_gram(paths, desc, SETTINGS)
    assert torch.equal(got, gram) and n == 40
    for order in ([1, 2, 0], [2, 0, 1], [2, 1, 0]):  # the same pool, reordered: a hit
        rotated, _ = cache.get_gram([paths[i] for i in order], desc, SETTINGS)
        assert torch.equal(rotated, gram[order][:, order])


def test_identical_members_share_a_gram_entry(pool, member, desc, cache, tmp_path):
    twin = str(tmp_path / "twin.safetensors")
    shutil.copyfile(member, twin)
    g = _gram(3)
    g[:, 2] = g[:, 1]
    g[2, :] = g[1, :]  # the twin's row and column equal the member's
    cache.put_gram([pool[1], member, twin], desc, SETTINGS, g, 40)
    got, _ = cache.get_gram([twin, pool[1], member], desc, SETTINGS)
    assert torch.equal(got, g[[2, 0, 1]][:, [2, 0, 1]])


@pytest.mark.parametrize("change", ["settings", "dataset", "member bytes", "pool"])
def test_gram_misses(pool, member, desc, cache, change):
    paths = [pool[1], member]
    cache.put_gram(paths, desc, SETTINGS, _gram(), 40)
    if change == "settings":
        assert cache.get_gram(paths, desc, dict(SETTINGS, normalize="l2")) is None
    elif change == "dataset":
        assert cache.get_gram(paths, dataset_description("lines1.6", N), SETTINGS) is None
    elif change == "member bytes":
        torch.manual_seed(7)
        save_member(create_member("resnet10t", 10, (3, 32, 32)), member)
        assert cache.get_gram(paths, desc, SETTINGS) is None
    else:
        assert cache.get_gram([pool[1]], desc, SETTINGS) is None


def test_a_corrupt_gram_entry_is_a_miss(pool, member, desc, cache):
    paths = [pool[1], member]
    path = cache.put_gram(paths, desc, SETTINGS, _gram(), 40)
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)  # the tensor bytes no longer match their checksum
    assert cache.get_gram(paths, desc, SETTINGS) is None
    with open(path, "wb") as f:
        f.write(b"not safetensors")
    assert cache.get_gram(paths, desc, SETTINGS) is None


def test_bad_gram_input_is_refused(pool, member, desc, cache):
    paths = [pool[1], member]
    with pytest.raises(DivfastError, match="gram: expected a finite float64"):
        cache.put_gram(paths, desc, SETTINGS, _gram().float(), 40)
    with pytest.raises(DivfastError, match=r"gram: .*\(2, 2\)"):
        cache.put_gram(paths, desc, SETTINGS, _gram(3), 40)
    with pytest.raises(DivfastError, match="gram: expected a finite"):
        cache.put_gram(paths, desc, SETTINGS, _gram() * float("nan"), 40)
    with pytest.raises(DivfastError, match="n_samples"):
        cache.put_gram(paths, desc, SETTINGS, _gram(), -1)
