"""Attribution diversity in evaluate() and `divfast eval`, and the attribution grid (paper Fig. 11).

The report's numbers are checked against a direct computation from ``member_attributions`` on the
same images; the CLI against the library and the figure against its documented size and rule.
Members have random weights (``create_member``) and most checks use the first images of the
embedded digits test split, so everything here is quick on a CPU.
"""

import doctest
import io
import json
import math

import pytest
import torch
from click.testing import CliRunner

from cli_helpers import assert_user_error
from cli_helpers import invoke as cli_invoke
from torch.utils.data import Subset

import divfast.report
import divfast.report.attribution_grid as grid_module
from divfast.attribution import member_attributions
from divfast.cli import main as cli_main
from divfast.data import digits_dataset, load_members
from divfast.ensembles import evaluate
from divfast.ensembles.evaluate import (ATTRIBUTION_METHODS, ATTRIBUTION_NORMALIZATIONS,
                                        ATTRIBUTION_TARGETS, attribution_examples)
from divfast.errors import DivfastError
from divfast.functional import attribution_diversity
from divfast.report import draw_attribution_grid, render_accuracy_by_dataset, render_eval
from divfast.report.attribution_grid import CELL_INCHES, DPI, TITLE_INCHES, saliency_masked



@pytest.fixture(scope="module")
def small():
    """The first 23 test images: batches of 10 leave an uneven last batch."""
    return Subset(digits_dataset("test"), range(23))


@pytest.fixture(scope="module")
def images_and_labels(small):
    x, y = digits_dataset("test").tensors
    return x[:len(small)], y[:len(small)]


def _report(members, data, **kw):
    return evaluate(members, data, "clean", batch_size=10, progress=False, **kw)


# --- evaluate() against a direct computation ---------------------------------------------------


@pytest.mark.parametrize("method, target, normalize", [
    ("saliency", "label", "none"),
    ("saliency", "ensemble", "l1"),
    ("saliency", "member", "max"),
    ("ig", "label", "l2"),
    ("ig", "member", "none"),
])
def test_report_equals_direct_computation(members, small, images_and_labels, method, target,
                                          normalize):
    """Batch by batch (10, 10, 3) inside evaluate's no_grad == all maps at once, outside it."""
    x, y = images_and_labels
    report = _report(members, small, attribution=method, ig_steps=2, attribution_target=target,
                     attribution_normalize=normalize)
    maps = member_attributions(members, x, target=target, labels=y, method=method,
                               ig_steps=2)  # (M, N, 3, H, W)
    assert float(maps.abs().sum()) > 0  # real gradients, not an all-zero no_grad artefact
    ref = attribution_diversity(maps, normalize=normalize)
    block = report["attribution"]
    assert block["diversity"] > 0
    assert block["diversity"] == pytest.approx(ref["diversity"], rel=1e-5)
    assert torch.allclose(torch.tensor(block["pairwise"]), torch.tensor(ref["pairwise"]),
                          rtol=1e-5, atol=0)
    assert torch.allclose(torch.tensor(block["gram"]), torch.tensor(ref["gram"]), rtol=1e-5,
                          atol=1e-12 * float(torch.tensor(ref["gram"]).abs().max()))
    expected = {"method": method, "target": target, "normalize": normalize, "abs": True,
                "ddof": 0}
    if method == "ig":
        expected["ig_steps"] = 2
    options = {k: v for k, v in block.items() if k not in ("diversity", "pairwise", "gram")}
    assert options == expected


def test_member_attributions_work_inside_no_grad(members, images_and_labels):
    x, y = images_and_labels
    with torch.no_grad():
        inside = member_attributions(members, x[:4], labels=y[:4])
    outside = member_attributions(members, x[:4], labels=y[:4])
    assert float(inside.abs().sum()) > 0
    assert torch.equal(inside, outside)


def test_default_is_saliency_on_true_labels(members, small):
    block = evaluate(members, small, "clean", progress=False)["attribution"]
    assert (block["method"], block["target"], block["normalize"]) == ("saliency", "label", "none")
    assert "ig_steps" not in block


def test_pairwise_is_symmetric_with_zero_diagonal(members, small):
    pairwise = torch.tensor(_report(members, small)["attribution"]["pairwise"])
    assert pairwise.shape == (3, 3)
    assert torch.equal(pairwise, pairwise.T) and bool((pairwise.diagonal() == 0).all())
    assert bool((pairwise[~torch.eye(3, dtype=torch.bool)] > 0).all())


def test_report_round_trips_json_without_nan(members, small):
    report = _report(members, small)
    text = json.dumps(report, allow_nan=False)  # raises on NaN or infinity
    assert json.loads(text) == report


def _grad_modes(members):
    """Records, per forward of each member's network, whether autograd was recording."""
    seen = []
    handles = [m.model.register_forward_pre_hook(lambda mod, args: seen.append(
        torch.is_grad_enabled())) for m in members]
    return seen, handles


def test_none_gives_null_and_takes_no_backward(members, small, monkeypatch):
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad",
                        lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    seen, handles = _grad_modes(members)
    try:
        report = _report(members, small, attribution="none")
        assert report["attribution"] is None
        assert seen and not any(seen)  # every forward ran without autograd
        assert calls == []
        seen.clear()
        _report(members, small)  # saliency: the same spies see gradients taken
        assert any(seen) and calls
    finally:
        for h in handles:
            h.remove()


def test_none_keeps_the_rest_of_the_report(members, small):
    with_maps, without = _report(members, small), _report(members, small, attribution="none")
    with_maps.pop("attribution"), without.pop("attribution")
    assert json.dumps(with_maps, sort_keys=True) == json.dumps(without, sort_keys=True)


@pytest.mark.parametrize("kwargs, flag", [
    ({"attribution": "gradcam"}, "--attribution"),
    ({"attribution": "ig", "ig_steps": 0}, "--ig-steps"),
    ({"ig_steps": -1}, "--ig-steps"),
    ({"ig_steps": 2.5}, "--ig-steps"),
    ({"attribution_target": "nope"}, "--attribution-target"),
    ({"attribution_normalize": "l3"}, "--attribution-normalize"),
])
def test_bad_options_name_the_flag(members, small, kwargs, flag):
    with pytest.raises(DivfastError, match=flag):
        _report(members, small, **kwargs)


def test_cli_choices_match_the_library():
    assert cli_main.ATTRIBUTION_METHODS == ATTRIBUTION_METHODS
    assert cli_main.ATTRIBUTION_TARGETS == ATTRIBUTION_TARGETS
    assert cli_main.ATTRIBUTION_NORMALIZATIONS == ATTRIBUTION_NORMALIZATIONS


# --- the examples for the figure ---------------------------------------------------------------


def test_attribution_examples_are_the_first_images_and_their_maps(members, small,
                                                                  images_and_labels):
    x, y = images_and_labels
    ex = attribution_examples(members, small, 4)
    assert torch.equal(ex.images, x[:4]) and torch.equal(ex.labels, y[:4])
    assert ex.maps.shape == (3, 4, 3, 32, 32)
    direct = member_attributions(members, x[:4], labels=y[:4])
    assert torch.allclose(ex.maps, direct, rtol=1e-5, atol=1e-7)
    assert (ex.method, ex.target, ex.ig_steps) == ("saliency", "label", 10)


def test_attribution_examples_options(members, small, images_and_labels):
    x, y = images_and_labels
    ex = attribution_examples(members, Subset(small, range(2)), 4, "ig", 2, "ensemble")
    assert ex.maps.shape == (3, 2, 3, 32, 32)  # fewer images than asked: all of them
    direct = member_attributions(members, x[:2], target="ensemble", method="ig", ig_steps=2)
    assert torch.allclose(ex.maps, direct, rtol=1e-5, atol=1e-7)
    with pytest.raises(DivfastError, match="--attribution"):
        attribution_examples(members, small, 4, "none")
    with pytest.raises(DivfastError, match="n: "):
        attribution_examples(members, small, 0)


# --- the grid ----------------------------------------------------------------------------------


def test_saliency_masked_rule():
    """Mask = max over channels of |map|, divided by the map's own maximum; image times mask."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 5, 6, generator=g)
    maps = torch.randn(3, 2, 3, 5, 6, generator=g)
    maps[1, 0] = 0.0  # an all-zero map masks everything
    out = saliency_masked(images, maps)
    assert out.shape == (3, 2, 3, 5, 6) and out.dtype == torch.float32
    for m in range(3):
        for n in range(2):
            mask = maps[m, n].abs().max(dim=0).values
            mask = mask / mask.max() if mask.max() > 0 else mask
            assert torch.allclose(out[m, n], images[n] * mask, atol=1e-7)
    assert bool((out[1, 0] == 0).all())
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # each map scaled by its own maximum: any per-map normalisation draws the same figure
    scale = torch.tensor([3.0, 0.5, 7.0]).view(3, 1, 1, 1, 1)
    assert torch.allclose(saliency_masked(images, maps * scale), out, atol=1e-7)


def test_grid_png_size_matches_rows_and_columns(tmp_path):
    from PIL import Image

    path = tmp_path / "grid.png"
    draw_attribution_grid(torch.rand(3, 3, 16, 16), torch.rand(2, 3, 3, 16, 16), ["a", "b"],
                          str(path), row_labels=["x", "y", "z"], title="t")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (round(DPI * CELL_INCHES * 3),
                            round(DPI * (CELL_INCHES * 3 + TITLE_INCHES)))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary left behind


@pytest.mark.parametrize("ext", ["svg", "pdf"])
def test_grid_other_formats(tmp_path, ext):
    path = tmp_path / f"grid.{ext}"
    draw_attribution_grid(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 3, 8, 8), ["a"], str(path))
    head = path.read_bytes()[:200]
    assert (b"<svg" in head or b"<?xml" in head) if ext == "svg" else head.startswith(b"%PDF")


@pytest.mark.parametrize("images, maps, names, path, arg", [
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3, 8, 8), ["a"], "g.png", "member_names"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 3, 8, 8), ["a", "b"], "g.png", "maps"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3, 8, 9), ["a", "b"], "g.png", "maps"),
    (torch.rand(2, 1, 8, 8), torch.rand(2, 2, 3, 8, 8), ["a", "b"], "g.png", "images"),
    (torch.rand(2, 3, 8, 8), torch.full((2, 2, 3, 8, 8), float("nan")), ["a", "b"], "g.png",
     "maps"),
    (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 3, 8, 8), ["a", "b"], "g.gif", "path"),
])
def test_grid_bad_input(tmp_path, images, maps, names, path, arg):
    with pytest.raises(DivfastError, match=f"^{arg}: "):
        draw_attribution_grid(images, maps, names, str(tmp_path / path))
    assert list(tmp_path.iterdir()) == []


def test_grid_docstring_example():
    result = doctest.testmod(grid_module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# --- the tables --------------------------------------------------------------------------------


def test_eval_table_has_the_attribution_row(members, small):
    report = _report(members, small, attribution="ig", ig_steps=2)
    buf = io.StringIO()
    render_eval(report, file=buf)
    row = next(line for line in buf.getvalue().splitlines() if "│ attribution" in line)
    assert f"{report['attribution']['diversity']:.4g}" in row and "↑" in row
    assert "variance of members' IG (2 steps) maps (Eq. 7)" in row

    report["attribution"] = None
    buf = io.StringIO()
    render_eval(report, file=buf)
    assert "│ attribution" not in buf.getvalue()


def test_accuracy_by_dataset_has_the_attribution_column(members, small):
    report = _report(members, small)
    buf = io.StringIO()
    render_accuracy_by_dataset([report, dict(report, dataset="other", attribution=None)], file=buf)
    text = buf.getvalue()
    assert "attribution" in text
    assert f"{report['attribution']['diversity']:.4g}" in text
    old = {k: v for k, v in report.items() if k != "attribution"}  # a report from before the key
    buf = io.StringIO()
    render_accuracy_by_dataset([old], file=buf)
    assert "attribution" not in buf.getvalue()


# --- the command line --------------------------------------------------------------------------


def invoke(args):
    return cli_invoke(CliRunner(), args)




@pytest.mark.parametrize("extra, flag", [
    (["--attribution", "gradcam"], "--attribution"),
    (["--ig-steps", "0"], "--ig-steps"),
    (["--attribution", "ig", "--ig-steps", "-2"], "--ig-steps"),
    (["--ig-steps", "ten"], "--ig-steps"),
    (["--attribution-target", "nope"], "--attribution-target"),
    (["--attribution-normalize", "l3"], "--attribution-normalize"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_cli_bad_attribution_options(member_files, tmp_path, extra, flag):
    out = tmp_path / "out"
    result = invoke(["eval", "--members", ",".join(member_files), "--no-progress", "--out", str(out),
                     *extra])
    assert_user_error(result, flag)
    assert not out.exists()  # refused before any work


def test_cli_out_writes_the_grid(member_files, tmp_path):
    out = tmp_path / "out"
    result = invoke(["eval", "--members", ",".join(member_files), "--no-progress", "--device", "cpu",
                     "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["attributions.png", "report.json"]
    lines = result.stdout.splitlines()
    assert f"wrote {out / 'report.json'}" in lines and f"wrote {out / 'attributions.png'}" in lines
    assert "variance of members' Saliency maps (Eq. 7)" in result.stdout

    from PIL import Image

    with Image.open(out / "attributions.png") as img:  # 4 rows; input + 2 members
        assert img.format == "PNG"
        assert img.size == (round(DPI * CELL_INCHES * 3),
                            round(DPI * (CELL_INCHES * 4 + TITLE_INCHES)))
    report = json.loads((out / "report.json").read_text())
    assert report["attribution"]["method"] == "saliency"
    assert math.isfinite(report["attribution"]["diversity"])


def test_cli_grid_arguments_and_json(member_files, tmp_path, monkeypatch):
    """The grid gets the first four images, every member's maps of them and the member names; the
    JSON on stdout is the library's report (IG, 2 steps, ensemble target, l2)."""
    seen = {}

    def stub(images, maps, member_names, path, **kwargs):
        seen.update(images=images, maps=maps, names=member_names, path=path, **kwargs)

    monkeypatch.setattr(divfast.report, "draw_attribution_grid", stub)
    opts = ["--attribution", "ig", "--ig-steps", "2", "--attribution-target", "ensemble",
            "--attribution-normalize", "l2"]
    out = tmp_path / "out"
    result = invoke(["eval", "--members", ",".join(member_files), "--no-progress", "--device", "cpu",
                     "--json", "--out", str(out), *opts])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout is the JSON alone
    assert report["attribution"]["method"] == "ig" and report["attribution"]["ig_steps"] == 2
    assert report["attribution"]["target"] == "ensemble"
    assert report["attribution"]["normalize"] == "l2"

    x, y = digits_dataset("test").tensors
    assert torch.equal(seen["images"], x[:4])
    assert seen["maps"].shape == (2, 4, 3, 32, 32)
    direct = member_attributions(load_members(member_files), x[:4], target="ensemble", method="ig",
                                 ig_steps=2)
    assert torch.allclose(seen["maps"], direct, rtol=1e-5, atol=1e-7)
    assert seen["names"] == ["m0", "m1"] and seen["path"] == str(out / "attributions.png")
    assert seen["row_labels"] == [f"label {int(v)}" for v in y[:4]]

    lib = evaluate(load_members(member_files), digits_dataset("test"), "clean", progress=False,
                   attribution="ig", ig_steps=2, attribution_target="ensemble",
                   attribution_normalize="l2")
    lib["member_files"] = report["member_files"]
    assert json.dumps(lib, sort_keys=True) == json.dumps(report, sort_keys=True)


def test_cli_attribution_none(member_files, tmp_path):
    out = tmp_path / "out"
    result = invoke(["eval", "--members", ",".join(member_files), "--no-progress", "--device", "cpu",
                     "--attribution", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no maps, no figure
    assert "attributions.png" not in result.stdout and "│ attribution" not in result.stdout
    assert json.loads((out / "report.json").read_text())["attribution"] is None
