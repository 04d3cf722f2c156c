"""The CKA heat maps (paper Figure 12) and the representation table of the eval report."""

import doctest
import io
import json
import math

import matplotlib
import pytest
import torch

import divfast.report.cka_maps as cka_module
from divfast.errors import DivfastError
from divfast.report import draw_cka_maps, render_eval
from divfast.report.cka_maps import DPI, cka_figure, tick_positions
from divfast.report.table import MEASURE_DOCS, representation_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _block(layer_counts=(3, 3, 2), kernel="linear", seed=0, skipped=0):
    """A block of the report's shape: random symmetric CKA in [0, 1], diagonal 1."""
    g = torch.Generator().manual_seed(seed)
    members = [f"m{i}" for i in range(len(layer_counts))]
    layers = [[f"layer{d}" for d in range(n)] for n in layer_counts]
    total = sum(layer_counts)
    cka = torch.rand(total, total, generator=g, dtype=torch.float64)
    cka = (cka + cka.T) / 2
    cka.fill_diagonal_(1.0)
    depth = min(layer_counts)
    by_depth = [{"depth": d, "relative_depth": d / max(depth - 1, 1),
                 "layers": [names[d] for names in layers], "mean_cross_member_cka": 0.5 + d / 100}
                for d in range(depth)]
    return {"kernel": kernel, "bandwidth": 0.5 if kernel == "rbf" else None, "members": members,
            "layers": layers, "names": [f"{m}/{n}" for m, names in zip(members, layers)
                                        for n in names],
            "cka": cka.tolist(), "by_depth": by_depth,
            "mean_cross_member_cka": sum(r["mean_cross_member_cka"] for r in by_depth) / depth,
            "batches": 12, "skipped_samples": skipped}


@pytest.fixture
def figure():
    """Builds a figure with cka_figure and closes it after the test."""
    made = []

    def build(*args, **kwargs):
        made.append(cka_figure(*args, **kwargs))
        return made[-1]

    yield build
    for fig in made:
        plt.close(fig)


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_title()]  # the colorbar's axes has no title


# --- tick thinning -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, max_ticks", [(1, 24), (10, 24), (24, 24), (25, 24), (40, 24),
                                          (93, 24), (93, 5), (93, 1), (7, 2), (500, 24)])
def test_tick_positions(n, max_ticks):
    ticks = tick_positions(n, max_ticks)
    assert 1 <= len(ticks) <= max_ticks and ticks[0] == 0 and ticks[-1] < n
    assert len({b - a for a, b in zip(ticks, ticks[1:])}) <= 1  # one step: evenly spaced
    if n <= max_ticks:
        assert ticks == list(range(n))
    elif max_ticks > 1:  # the smallest step whose labels reach the last layer
        step = ticks[1] - ticks[0]
        assert ticks[-1] + step > n - 1 and (max_ticks - 1) * (step - 1) < n - 1


def test_many_layers_are_thinned_and_labelled_by_name(figure):
    block = _block((93, 40))
    fig = figure(block)
    (ax,) = _panels(fig)
    rows, cols = ax.get_yticks(), ax.get_xticks()
    assert len(rows) == 24 and len(cols) == 20
    first, second = block["layers"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [first[int(r)] for r in rows]
    assert [t.get_text() for t in ax.get_xticklabels()] == [second[int(c)] for c in cols]
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 6
    fig = figure(block, max_ticks=5)
    (ax,) = _panels(fig)
    assert list(ax.get_yticks()) == [0, 23, 46, 69, 92] and len(ax.get_xticks()) <= 5


def test_few_layers_label_every_layer(figure):
    fig = figure(_block((3, 2)))
    (ax,) = _panels(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer0", "layer1", "layer2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer0", "layer1"]


# --- panels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts, pairs, titles", [
    ((3, 2), "cross", ["m0 vs m1"]),
    ((3, 2, 2), "cross", ["m0 vs m1", "m0 vs m2", "m1 vs m2"]),
    ((2, 2, 2, 2), "cross", ["m0 vs m1", "m0 vs m2", "m0 vs m3", "m1 vs m2", "m1 vs m3",
                             "m2 vs m3"]),
    ((4,), "all", ["m0 vs m0"]),
    ((3, 2), "all", ["m0 vs m0", "m0 vs m1", "m1 vs m1"]),
])
def test_one_panel_per_pair(figure, counts, pairs, titles):
    block = _block(counts)
    fig = figure(block, pairs=pairs)
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == titles
    names = block["layers"]
    starts = [sum(counts[:m]) for m in range(len(counts))]
    for ax, title in zip(panels, titles):
        i, j = (int(name[1:]) for name in title.split(" vs "))
        assert ax.get_ylabel() == f"m{i}" and ax.get_xlabel() == f"m{j}"
        (image,) = ax.get_images()
        data = image.get_array()
        assert data.shape == (len(names[i]), len(names[j]))  # rows: member i, first layer on top
        want = torch.tensor(block["cka"], dtype=torch.float64)[starts[i]:starts[i] + counts[i],
                                          starts[j]:starts[j] + counts[j]]
        assert torch.allclose(torch.as_tensor(data.filled(math.nan)), want)
        assert image.get_clim() == (0.0, 1.0)
        assert image.origin == "upper"
    assert len(fig.axes) == len(titles) + 1  # one shared colorbar, no empty grid cells
    assert fig.axes[-1].get_ylabel() == "CKA"


def test_layout_one_row_up_to_three_panels_then_wraps(figure):
    fig = figure(_block((2, 2, 2)))
    rows = {round(ax.get_position().y0, 3) for ax in _panels(fig)}
    width, height = fig.get_size_inches()
    assert len(rows) == 1 and width > 2 * height
    fig = figure(_block((2, 2, 2, 2, 2)))  # 10 pairs
    rows = {round(ax.get_position().y0, 3) for ax in _panels(fig)}
    assert len(rows) == 3


def test_colour_clips_but_keeps_values_and_nan_is_allowed(figure):
    block = _block((2, 2))
    block["cka"][0][2] = block["cka"][2][0] = 1.2
    block["cka"][1][3] = block["cka"][3][1] = -0.1
    block["cka"][1][2] = block["cka"][2][1] = None  # NaN after a JSON round trip
    fig = figure(json.loads(json.dumps(block)))
    (image,) = _panels(fig)[0].get_images()
    data = image.get_array()
    assert data[0, 0] == 1.2 and data[1, 1] == -0.1 and bool(data.mask[1, 0])
    assert image.get_clim() == (0.0, 1.0)


def test_rbf_title_names_the_bandwidth(figure):
    fig = figure(_block((2, 2), kernel="rbf"))
    assert fig.get_suptitle() == "minibatch CKA (rbf kernel, bandwidth 0.5)"


# --- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts, pairs", [((4,), "all"), ((3, 2), "cross"),
                                           ((3, 2, 2), "cross")])
def test_png_written_at_the_figure_size(tmp_path, counts, pairs):
    from PIL import Image

    path = tmp_path / "cka.png"
    block = _block(counts)
    assert draw_cka_maps(block, path, pairs=pairs) == path
    fig = cka_figure(block, pairs)
    want = tuple(round(DPI * s) for s in fig.get_size_inches())
    plt.close(fig)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == want
    assert [p.name for p in tmp_path.iterdir()] == ["cka.png"]  # no temporary left behind


@pytest.mark.parametrize("ext", ["svg", "pdf"])
def test_other_formats(tmp_path, ext):
    path = str(tmp_path / f"cka.{ext}")
    draw_cka_maps(_block((2, 2)), path)
    with open(path, "rb") as f:
        head = f.read(200)
    assert (b"<svg" in head or b"<?xml" in head) if ext == "svg" else head.startswith(b"%PDF")


def _bad(**changes):
    block = _block((2, 2))
    for key, value in changes.items():
        if value is KeyError:
            del block[key]
        else:
            block[key] = value
    return block


@pytest.mark.parametrize("block, kwargs, path, arg", [
    (None, {}, "c.png", r"block: .*None"),
    ([[1.0]], {}, "c.png", "block: expected"),
    (_bad(cka=KeyError), {}, "c.png", "block: missing key 'cka'"),
    (_bad(members=[]), {}, "c.png", r"block\['members'\]: "),
    (_bad(layers=[["a", "b"]]), {}, "c.png", r"block\['layers'\]: expected 2 "),
    (_bad(layers=[["a", "b"], []]), {}, "c.png", r"block\['layers'\]: "),
    (_bad(cka=[[1.0] * 4] * 3), {}, "c.png", r"block\['cka'\]: expected 4 x 4 .* got 3 x 4"),
    (_bad(cka=[[1.0] * 3] * 4), {}, "c.png", r"block\['cka'\]: expected 4 x 4"),
    (_bad(cka=[[1.0, 1.0, "x", 1.0]] * 4), {}, "c.png", r"block\['cka'\]: expected numbers"),
    (_bad(names=["a"]), {}, "c.png", r"block\['names'\]: expected 4 "),
    (_bad(), {"pairs": "upper"}, "c.png", "pairs: expected 'cross' or 'all'"),
    (_bad(), {"max_ticks": 0}, "c.png", "max_ticks: "),
    (_block((3,)), {}, "c.png", "pairs: 'cross' needs at least 2 members, the block has 1"),
    (_bad(), {}, "c.gif", "path: "),
    (_bad(), {}, "c", "path: "),
])
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path, block, kwargs, path, arg):
    with pytest.raises(DivfastError, match=f"^{arg}"):
        draw_cka_maps(block, str(tmp_path / path), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_docstring_examples():
    result = doctest.testmod(cka_module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# --- the table ---------------------------------------------------------------------------------


@pytest.fixture
def report():
    """An eval report (schema divfast.eval/1) from before the key, as ``evaluate`` writes it."""
    members = [{"name": f"m{i}", "architecture": "resnet10t", "parameters": 4_900_000,
                "top1": 0.5 + i / 10, "top5": 0.9} for i in range(2)]
    return {"schema": "divfast.eval/1", "dataset": "clean", "n_samples": 8, "num_classes": 10,
            "members": members,
            "ensemble": {"consensus": "average", "top1": 0.625, "top5": 0.875, "best_member": "m1",
                         "gain_top1": 0.025},
            "diversity": {name: 0.25 for name in MEASURE_DOCS}, "pairwise": {},
            "attribution": None}


def _render(report):
    buf = io.StringIO()
    render_eval(report, file=buf)
    return buf.getvalue()


def test_report_without_the_key_or_with_none_renders_without_the_section(report):
    for old in (report, dict(report, representation=None)):
        text = _render(old)
        assert "prediction diversity" in text
        assert "representation similarity" not in text and "CKA" not in text


def test_eval_table_has_a_row_per_depth_and_the_mean(report):
    block = _block((3, 3, 2))
    text = _render(dict(report, representation=block))
    assert "representation similarity (minibatch CKA, linear)" in text
    lines = text.splitlines()
    for row in block["by_depth"]:  # a column per member (3 <= 4), the mean to 3 decimals
        line = next(line for line in lines if line.startswith(f"│ {row['depth']:>5} │"))
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        assert cells == [str(row["depth"]), *row["layers"], f"{row['mean_cross_member_cka']:.3f}"]
    header = next(line for line in lines if line.startswith("┃ depth"))
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["depth", "m0", "m1", "m2",
                                                                 "mean cross-member CKA"]
    summary = next(line for line in lines if line.startswith("mean cross-member CKA over depths"))
    assert f"{block['mean_cross_member_cka']:.3f}" in summary and "12 batches" in summary
    assert "skipped" not in summary


def test_skipped_samples_and_rbf(report):
    table, summary = representation_table(_block((2, 2), kernel="rbf", skipped=3))
    assert table.title == "representation similarity (minibatch CKA, rbf, bandwidth 0.5)"
    assert summary.endswith("(12 batches; 3 samples skipped in batches under 4 samples)")


def test_many_members_share_one_layer_column(report):
    block = _block((2, 2, 2, 2, 2))
    text = _render(dict(report, representation=block))
    assert "layers (m0 / m1 / m2 / m3 / m4)" in text
    assert "layer1 / layer1 / layer1 / layer1 / layer1" in text


def test_names_with_brackets_are_not_markup(report):
    block = _block((2, 2))
    block["members"] = ["net[a]", "net[b]"]
    block["by_depth"][0]["layers"] = ["features[0]", "blocks[1]"]
    text = _render(dict(report, representation=block))
    assert "net[a]" in text and "features[0]" in text and "blocks[1]" in text


def test_long_layer_names_are_shortened_in_the_middle(figure):
    block = _block((2, 2))
    block["layers"][0][0] = "encoder.layers.11.attention.output.dense"
    (ax,) = _panels(figure(block))
    label = ax.get_yticklabels()[0].get_text()
    assert label == "encoder.layer...output.dense" and len(label) == 28
