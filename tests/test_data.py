"""The embedded digits, dataset specs and ImageFolder loading.

The digits are checked against scikit-learn's raw arrays (not against divfast's own cache), so a
change to the split, the upsampling or the label order shows up here.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from divfast.data import build_dataset, digits_dataset, parse_dataset_spec
from divfast.data.digits import digits_uint8
from divfast.errors import DivfastError


@pytest.fixture(scope="module")
def raw_digits():
    """scikit-learn's digits, upsampled here the way the module docstring describes (bilinear to
    32x32, then uint8), keyed by image bytes so the splits can be matched back to raw indices."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 1, 32, 32)
    y = torch.as_tensor(d.target, dtype=torch.long)
    return x, y


def _keys(images_u8: torch.Tensor, labels: torch.Tensor) -> Counter:
    """Multiset of (image bytes, label) over a split; one channel suffices (the three are equal)."""
    return Counter((img[0].numpy().tobytes(), int(lab)) for img, lab in zip(images_u8, labels))


# --- the embedded digits -----------------------------------------------------------------------


def test_split_sizes():
    assert len(digits_dataset("train")) == 1257
    assert len(digits_dataset("test")) == 540


@pytest.mark.parametrize("split", ["train", "test"])
def test_shapes_dtype_range(split):
    x, y = digits_dataset(split).tensors
    assert x.shape[1:] == (3, 32, 32)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert x.shape[0] == y.shape[0]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.max()) == 1.0  # the ink reaches full intensity: no accidental double scaling
    # greyscale replicated to three channels
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # a single sample through the Dataset API has the documented shape
    img, label = digits_dataset(split)[0]
    assert img.shape == (3, 32, 32) and label.dim() == 0


def test_deterministic_across_calls():
    a_x, a_y = digits_dataset("test").tensors
    b_x, b_y = digits_dataset("test").tensors
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    a_x, a_y = digits_dataset("train").tensors
    b_x, b_y = digits_dataset("train").tensors
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)


def test_split_is_deterministic_in_a_fresh_process():
    """The lru_cache could hide a seed problem; a second interpreter must see the same split."""
    import subprocess
    import sys

    code = ("from divfast.data import digits_dataset; import hashlib; "
            "x, y = digits_dataset('test').tensors; "
            "print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    import hashlib

    x, y = digits_dataset("test").tensors
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    assert out.stdout.strip() == digest


def test_float_dataset_is_uint8_over_255():
    for split in ("train", "test"):
        xu, yu = digits_uint8(split)
        x, y = digits_dataset(split).tensors
        assert xu.dtype == torch.uint8
        assert torch.equal(x, xu.float() / 255.0)
        assert torch.equal(y, yu)


def test_splits_partition_the_raw_digits(raw_digits):
    """Train and test together are exactly scikit-learn's 1,797 images with their labels, each raw
    sample in one split only (matched as multisets: a few raw images are duplicates of others)."""
    raw_x, raw_y = raw_digits
    train = _keys(*digits_uint8("train"))
    test = _keys(*digits_uint8("test"))
    raw = _keys(raw_x, raw_y)
    assert sum(raw.values()) == 1797
    assert train + test == raw


@pytest.mark.parametrize("split", ["train", "test"])
def test_all_classes_present_and_stratified(split, raw_digits):
    _, raw_y = raw_digits
    _, y = digits_dataset(split).tensors
    counts = torch.bincount(y, minlength=10)
    assert counts.shape == (10,) and bool((counts > 0).all())
    # stratified: each class keeps its raw share (30 % test) within one sample
    raw_counts = torch.bincount(raw_y, minlength=10).double()
    share = 0.3 if split == "test" else 0.7
    assert torch.all((counts.double() - share * raw_counts).abs() <= 1.0)


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        digits_dataset("validation")


# --- dataset specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["clean", "CLEAN", " clean "])
def test_parse_clean(spec):
    assert parse_dataset_spec(spec) == ("clean", 0.0)


@pytest.mark.parametrize("spec", ["nope", "", "clean2", "lines", "foo1.0"])
def test_unknown_spec(spec):
    with pytest.raises(DivfastError) as info:
        parse_dataset_spec(spec)
    msg = str(info.value)
    assert "--dataset" in msg and "clean" in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)  # library callers can catch ValueError


def test_build_dataset_defaults_to_digits_test():
    ds = build_dataset("clean")
    x, y = ds.tensors
    ref_x, ref_y = digits_dataset("test").tensors
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert len(build_dataset("clean", split="train")) == 1257


def test_build_dataset_unknown_spec():
    with pytest.raises(DivfastError, match="--dataset"):
        build_dataset("nope")


def test_build_dataset_missing_data_dir(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DivfastError) as info:
        build_dataset("clean", data=str(missing))
    assert "--data" in str(info.value) and str(missing) in str(info.value)


def test_build_dataset_data_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DivfastError, match="--data"):
        build_dataset("clean", data=str(f))


def test_build_dataset_empty_image_folder(tmp_path):
    with pytest.raises(DivfastError, match="--data"):
        build_dataset("clean", data=str(tmp_path))


# --- ImageFolder -------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    colours = {"cat": [(255, 0, 0), (200, 10, 10)], "dog": [(0, 0, 255), (10, 10, 200)]}
    for cls, cols in colours.items():
        (root / cls).mkdir(parents=True)
        for i, col in enumerate(cols):
            Image.new("RGB", (40, 50), col).save(root / cls / f"{i}.png")  # 40 wide, 50 high
    return root


def test_image_folder_loads(image_folder):
    ds = build_dataset("clean", data=str(image_folder), image_size=32)
    assert len(ds) == 4
    assert ds.classes == ["cat", "dog"]
    labels = []
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(img, torch.Tensor)
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        labels.append(label)
    assert labels == [0, 0, 1, 1]
    # solid colours survive resize and crop: first image is pure red
    red, _ = ds[0]
    assert torch.allclose(red[0], torch.ones(32, 32)) and float(red[1:].abs().max()) == 0.0


def test_image_folder_default_size_is_224(image_folder):
    img, _ = build_dataset("clean", data=str(image_folder))[0]
    assert img.shape == (3, 224, 224)


def test_image_folder_spec_still_checked(image_folder):
    with pytest.raises(DivfastError, match="--dataset"):
        build_dataset("nope", data=str(image_folder))
