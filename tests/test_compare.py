"""compare_ensembles (paper Figure 10's numbers) against a direct computation, one data pass for
all ensembles, the figure and table, and `divfast compare`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from cli_helpers import assert_user_error, invoke
from divfast.data import build_dataset, save_member
from divfast.ensembles import compare_ensembles, consensus_predictions
from divfast.errors import DivfastError
from divfast.functional import prediction_diversity


@pytest.fixture(scope="module")
def three_files(tmp_path_factory, members):
    folder = tmp_path_factory.mktemp("trio")
    paths = []
    for member in members:
        paths.append(str(folder / f"{member.name}.safetensors"))
        save_member(member, paths[-1])
    return paths


def _direct(paths, members, spec, rule, n):
    dataset = build_dataset(spec, image_size=32)
    x = torch.stack([dataset[i][0] for i in range(n)])
    y = torch.tensor([dataset[i][1] for i in range(n)])
    by_path = {os.path.basename(p): m for p, m in zip(paths, members)}
    with torch.no_grad():
        logits = torch.stack([by_path[os.path.basename(p)](x) for p in paths])
    acc = float((consensus_predictions(logits, rule) == y).double().mean())
    member_acc = (logits.argmax(-1) == y).double().mean(1).tolist()
    return acc, member_acc, prediction_diversity(logits, y)["disagreement"]


def test_rows_equal_a_direct_computation(three_files, members, passes):
    groups = {"trio": three_files, "pair": ",".join(three_files[:2])}
    result = compare_ensembles(groups, "clean,lines1.6", rules=["average", "vote"], num_samples=40)
    assert passes["loads"] == 3  # each member loaded once, for both datasets and both ensembles
    assert result["schema"] == "divfast.compare/1" and result["rules"] == ["average", "vote"]
    assert [d["num_samples"] for d in result["datasets"]] == [40, 40]
    assert len(result["rows"]) == 2 * 2 * 2
    assert [r["ensemble"] for r in result["rows"]][:4] == ["trio"] * 4  # ensemble-major
    for row in result["rows"]:
        paths = three_files if row["ensemble"] == "trio" else three_files[:2]
        acc, member_acc, disagreement = _direct(paths, members, row["dataset"], row["rule"], 40)
        assert row["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert row["member_accuracy"] == pytest.approx(member_acc, abs=1e-12)
        assert row["best_member_accuracy"] == max(row["member_accuracy"])
        assert row["gain"] == pytest.approx(acc - max(member_acc), abs=1e-12)
        assert row["disagreement"] == pytest.approx(disagreement, abs=1e-12)


def test_cache_makes_a_rerun_pass_free(three_files, tmp_path, passes):
    kw = dict(datasets="clean", num_samples=16, cache_dir=str(tmp_path / "cache"))
    first = compare_ensembles({"a": three_files}, **kw)
    loads = passes["loads"]
    assert compare_ensembles({"a": three_files}, **kw)["rows"] == first["rows"]
    assert passes["loads"] == loads


@pytest.mark.parametrize("groups, match", [
    ({}, "--ensemble"),
    ({"a": []}, "--ensemble a="),
    ({"a": "/no/such.safetensors"}, "does not exist"),
])
def test_bad_ensembles_are_named(groups, match):
    with pytest.raises(DivfastError, match=match):
        compare_ensembles(groups)


def test_bad_dataset_and_rule(three_files):
    with pytest.raises(DivfastError, match="--datasets"):
        compare_ensembles({"a": three_files}, "fog9")
    with pytest.raises(DivfastError, match="--rules"):
        compare_ensembles({"a": three_files}, "clean", rules=["mode"])
    with pytest.raises(DivfastError, match="--num-samples"):
        compare_ensembles({"a": three_files}, "clean", num_samples=0)


def test_cli_compare_writes_json_and_figure(three_files, tmp_path):
    out = tmp_path / "cmp"
    result = invoke(CliRunner(), ["compare", "--ensemble", f"trio={','.join(three_files)}",
                                  "--ensemble", f"pair={','.join(three_files[:2])}",
                                  "--datasets", "clean,plasma4.0", "--num-samples", "24",
                                  "--out", out, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "trio" in result.stdout and "pair" in result.stdout and "plasma4.0" in result.stdout
    with open(out / "comparison.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert {r["ensemble"] for r in saved["rows"]} == {"trio", "pair"}
    assert (out / "comparison_average.png").stat().st_size > 1000


@pytest.mark.parametrize("args, flag", [
    (["--ensemble", "noequals"], "--ensemble"),
    (["--ensemble", "a=x.safetensors", "--ensemble", "a=y.safetensors"], "--ensemble"),
    (["--ensemble", "=x.safetensors"], "--ensemble"),
])
def test_cli_compare_errors(args, flag):
    assert_user_error(invoke(CliRunner(), ["compare", *args]), flag)


def test_cli_compare_json(three_files):
    result = invoke(CliRunner(), ["compare", "--ensemble", f"trio={','.join(three_files)}",
                                  "--datasets", "clean", "--num-samples", "8", "--json",
                                  "--no-progress"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "divfast.compare/1" and len(doc["rows"]) == 1


def test_members_of_different_class_counts_are_refused_even_when_cached(three_files, tmp_path):
    from divfast.data.members import create_member

    other = str(tmp_path / "twelve.safetensors")
    save_member(create_member("resnet10t", 12, (3, 32, 32)), other)
    cache = str(tmp_path / "cache")
    compare_ensembles({"a": three_files[:1]}, "clean", num_samples=8, cache_dir=cache)
    compare_ensembles({"b": [other]}, "clean", num_samples=8, cache_dir=cache)
    with pytest.raises(DivfastError, match=r"--ensemble.*different numbers of classes"):
        compare_ensembles({"a": three_files[:1], "b": [other]}, "clean", num_samples=8,
                          cache_dir=cache)
