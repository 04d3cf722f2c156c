"""divfast.ensembles.sweep: every row checked against an independent computation on that subset's
own logits (consensus.target_rank, prediction_diversity, attribution_diversity); the cache makes a
rerun pass-free (counted); the CLI writes its files and gives one-line errors."""

import csv
import itertools
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import Subset

from cli_helpers import assert_user_error, invoke
from divfast.data import digits_dataset, load_member, save_member
from divfast.data.members import create_member
from divfast.ensembles.consensus import target_rank
from divfast.ensembles.sweep import ROW_KEYS, SCHEMA, all_subsets, run_sweep, sweep
from divfast.errors import DivfastError
from divfast.functional import attribution_diversity, prediction_diversity
from divfast.functional.prediction import NON_PAIRWISE, PAIRWISE

N_IMAGES = 40
POOL = 4


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    for i in range(POOL):
        torch.manual_seed(100 + i)
        save_member(create_member("resnet10t", 10, (3, 32, 32)), str(folder / f"m{i}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def pool_paths(pool_dir):
    return sorted(str(p) for p in pool_dir.glob("*.safetensors"))


@pytest.fixture(scope="module")
def pool_logits(pool_paths):
    """(K, N, C) logits of the pool on the first N_IMAGES digits, one direct forward each."""
    data = Subset(digits_dataset("test"), range(N_IMAGES))
    x = torch.stack([data[i][0] for i in range(N_IMAGES)])
    y = torch.tensor([int(data[i][1]) for i in range(N_IMAGES)])
    with torch.no_grad():
        logits = torch.stack([load_member(p)(x) for p in pool_paths])
    return logits, y, x


def _same(a, b, tol=1e-12):
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


def _check_rows(rows, logits, target, rules, k, names=None, parameters=None):
    subsets = list(itertools.combinations(range(logits.shape[0]), k))
    assert len(rows) == len(subsets) * len(rules)
    n = target.shape[0]
    correct = logits.argmax(dim=-1) == target  # (K, N)
    for r, row in enumerate(rows):
        assert tuple(row) == ROW_KEYS
        rule, idx = rules[r // len(subsets)], list(subsets[r % len(subsets)])
        assert row["rule"] == rule and row["indices"] == idx and row["k"] == k
        if names is not None:
            assert row["members"] == [names[i] for i in idx]
        sub = logits[idx]
        rank = target_rank(sub, target, rule)
        assert row["accuracy"] == int((rank == 0).sum()) / n
        assert row["top5"] == int((rank < 5).sum()) / n
        accs = [int(correct[i].sum()) / n for i in idx]
        assert row["best_member_accuracy"] == max(accs)
        assert _same(row["mean_member_accuracy"], sum(accs) / k)
        assert _same(row["gain"], row["accuracy"] - max(accs))
        expected = prediction_diversity(sub, target)
        for name in PAIRWISE + NON_PAIRWISE:
            assert _same(row[name], expected[name]), (name, row[name], expected[name], idx)
        assert row["parameters"] == (None if parameters is None
                                     else sum(parameters[i] for i in idx))
        assert row["attribution_diversity"] is None


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rows_equal_each_subset_computed_on_its_own(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(4, 57, 7, generator=gen)
    logits[3] = logits[1]  # an identical pair: Q and correlation undefined (NaN) for it
    logits[2, :, 0] += 3.0  # a member that mostly predicts class 0
    target = torch.randint(0, 7, (57,), generator=gen)
    rules = ["average", "vote", "median", "geometric"]
    names, params = ["a", "b", "c", "d"], [10, 20, 30, 40]
    rows = sweep(logits, target, k, rules, names=names, parameters=params)
    _check_rows(rows, logits, target, rules, k, names, params)
    if k == 1:
        assert all(math.isnan(row[name]) for row in rows for name in PAIRWISE)


def test_rows_on_real_member_logits(pool_logits):
    logits, target, _ = pool_logits
    rows = sweep(logits, target, 3, ("average", "vote"))
    _check_rows(rows, logits, target, ["average", "vote"], 3)


def test_given_subsets_and_their_order():
    logits, target = torch.randn(5, 30, 6), torch.randint(0, 6, (30,))
    rows = sweep(logits, target, 2, ["vote"], subsets=[[4, 0], [2, 3]])
    assert [row["indices"] for row in rows] == [[4, 0], [2, 3]]
    full = {tuple(r["indices"]): r for r in sweep(logits, target, 2, ["vote"])}
    for row in rows:
        other = full[tuple(sorted(row["indices"]))]
        for key in ("accuracy", "top5", "gain") + PAIRWISE + NON_PAIRWISE:
            assert _same(row[key], other[key]), key
    assert all_subsets(5, 2).tolist() == [list(c) for c in itertools.combinations(range(5), 2)]


def test_unknown_parameter_makes_the_sum_unknown():
    logits, target = torch.randn(3, 20, 4), torch.randint(0, 4, (20,))
    rows = sweep(logits, target, 2, ["average"], parameters=[5, None, 7])
    assert [row["parameters"] for row in rows] == [None, 12, None]


@pytest.mark.parametrize("kwargs, name", [
    ({"k": 0}, "k"), ({"k": 5}, "k"), ({"k": 2.0}, "k"), ({"rules": ["max"]}, "rules"),
    ({"rules": "vote"}, "rules"), ({"rules": []}, "rules"), ({"rules": ["vote", "vote"]}, "rules"),
    ({"names": ["a"]}, "names"), ({"parameters": [1, 2]}, "parameters"),
    ({"parameters": [1, 2, 3, -1]}, "parameters"),
    ({"pool_gram": torch.zeros(3, 3), "gram_samples": 4}, "pool_gram"),
    ({"pool_gram": torch.zeros(4, 4)}, "gram_samples"),
    ({"k": 2, "subsets": [[0, 0]]}, "subsets"), ({"k": 2, "subsets": [[0, 4]]}, "subsets"),
    ({"k": 2, "subsets": [[0, 1, 2]]}, "subsets"),
])
def test_bad_arguments_are_errors_naming_them(kwargs, name):
    logits, target = torch.randn(4, 10, 5), torch.randint(0, 5, (10,))
    with pytest.raises(DivfastError, match=rf"^{name}\b"):
        sweep(logits, target, **{"k": 3, **kwargs})


def test_bad_pool_tensors_are_errors():
    with pytest.raises(DivfastError, match="^logits"):
        sweep(torch.randn(4, 10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(DivfastError, match="^target"):
        sweep(torch.randn(4, 10, 5), torch.zeros(9, dtype=torch.long))
    with pytest.raises(DivfastError, match="^target"):
        sweep(torch.randn(4, 10, 5), torch.full((10,), 5))


def test_run_sweep_rows_parameters_difficulty_and_a_pass_free_rerun(pool_paths, pool_logits,
                                                                    tmp_path, passes):
    cache = str(tmp_path / "cache")
    first = run_sweep(pool_paths, ["clean", "lines1.6"], k=3, cache_dir=cache,
                      num_samples=N_IMAGES, batch_size=N_IMAGES)  # batched as pool_logits
    assert passes == {"loads": POOL, "forwards": 2 * POOL}  # each member loaded once, run per dataset
    assert first["schema"] == SCHEMA
    assert [d["spec"] for d in first["datasets"]] == ["clean", "lines1.6"]
    assert [m["name"] for m in first["members"]] == [f"m{i}" for i in range(POOL)]
    params = [load_member(p).num_parameters() for p in pool_paths]
    assert [m["parameters"] for m in first["members"]] == params
    clean = [row for row in first["rows"] if row["dataset"] == "clean"]
    logits, target, _ = pool_logits
    _check_rows([{k: v for k, v in row.items() if k != "dataset"} for row in clean], logits,
                target, ["average", "vote"], 3, [f"m{i}" for i in range(POOL)], params)
    assert len(first["rows"]) == 2 * 2 * math.comb(POOL, 3)
    assert set(first["difficulty"]) == {"clean", "lines1.6"}
    assert list(first["difficulty"]["clean"]["groups"]) == ["resnet10t"]
    assert {c["rule"] for c in first["correlations"]} == {"average", "vote"}

    passes.update(loads=0, forwards=0)
    second = run_sweep(pool_paths, ["clean", "lines1.6"], k=3, cache_dir=cache,
                       num_samples=N_IMAGES, batch_size=8)
    assert passes == {"loads": 0, "forwards": 0}
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)


def test_run_sweep_groups(pool_paths):
    out = run_sweep(pool_paths, "clean", k=2, num_samples=12, groups=["a", "a", "b", "b"],
                    rules=["vote"])
    assert list(out["difficulty"]["clean"]["groups"]) == ["a", "b"]
    assert out["difficulty"]["clean"]["pairs"][0]["member_pairs"] == 4
    with pytest.raises(DivfastError, match=r"^groups \(--group\)"):
        run_sweep(pool_paths, "clean", k=2, num_samples=12, groups=["a"])


def test_attribution_diversity_equals_that_of_each_subsets_own_maps(pool_paths, pool_logits):
    from divfast.attribution import member_attributions
    from divfast.data import load_members

    n = 16
    out = run_sweep(pool_paths, ["clean"], k=3, rules=["average"], attribution="saliency",
                    num_samples=n, batch_size=8)
    _, target, x = pool_logits
    maps = member_attributions(load_members(pool_paths), x[:n], "label", labels=target[:n])
    assert out["rows"]
    for row in out["rows"]:
        expected = attribution_diversity(maps[row["indices"]])["diversity"]
        assert row["attribution_diversity"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert any(c["metric"] == "attribution_diversity" for c in out["correlations"])


def test_run_sweep_bad_input_names_the_option(pool_paths, tmp_path):
    other = tmp_path / "five.safetensors"
    save_member(create_member("resnet10t", 5, (3, 32, 32)), str(other))
    with pytest.raises(DivfastError, match=r"--pool.*classes"):
        run_sweep(pool_paths + [str(other)], ["clean"], num_samples=8)
    with pytest.raises(DivfastError, match=r"--pool.*does not exist"):
        run_sweep([str(tmp_path / "missing.safetensors")], ["clean"])
    with pytest.raises(DivfastError, match=r"--pool.*twice"):
        run_sweep([pool_paths[0], pool_paths[0]], ["clean"], k=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DivfastError, match=r"--pool.*no \*\.safetensors"):
        run_sweep(str(tmp_path / "empty"), "clean")
    with pytest.raises(DivfastError, match=r"--datasets"):
        run_sweep(pool_paths, ["clean", "nosuch3.0"])
    with pytest.raises(DivfastError, match=r"--k"):
        run_sweep(pool_paths, ["clean"], k=POOL + 1)
    with pytest.raises(DivfastError, match=r"--attribution"):
        run_sweep(pool_paths, ["clean"], attribution="ig")
    with pytest.raises(DivfastError, match=r"--num-samples"):
        run_sweep(pool_paths, ["clean"], num_samples=0)


def test_cli_sweep_writes_results_and_figures(pool_dir, tmp_path):
    out = tmp_path / "out"
    args = ["sweep", "--pool", pool_dir, "--k", 2, "--datasets", "clean,lines1.6", "--out", out,
            "--num-samples", 24, "--device", "cpu", "--no-progress"]
    result = invoke(CliRunner(), args)
    assert result.exit_code == 0, result.output
    for name in ("results.csv", "results.json", "bubble_average.png", "bubble_vote.png",
                 "trends.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert doc["schema"] == SCHEMA and len(table) == len(doc["rows"]) == 2 * 2 * math.comb(POOL, 2)
    assert table[0]["members"] == "+".join(doc["rows"][0]["members"])
    assert set(PAIRWISE + NON_PAIRWISE) <= set(table[0])
    assert float(table[0]["gain"]) == pytest.approx(doc["rows"][0]["gain"])
    assert "by gain" in result.stdout and "difficulty" in result.stdout
    assert os.path.isdir(out / "cache") and os.listdir(out / "cache")

    again = invoke(CliRunner(), args + ["--json"])  # from the cache
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["rows"] == doc["rows"]


@pytest.mark.parametrize("extra, flag", [
    (["--k", "9"], "--k"), (["--rules", "average,max"], "--rules"),
    (["--datasets", "clean,nosuch2.0"], "--datasets"), (["--attribution", "ig"], "--attribution"),
    (["--group", "a,b"], "--group"), (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "--device"), (["--num-samples", "0"], "--num-samples"),
])
def test_cli_sweep_bad_options_give_one_line_errors(pool_dir, tmp_path, extra, flag):
    args = ["sweep", "--pool", pool_dir, "--out", tmp_path / "out", "--num-samples", 8,
            "--no-progress"] + extra
    assert_user_error(invoke(CliRunner(), args), flag)


def test_cli_sweep_bad_pool(tmp_path):
    assert_user_error(invoke(CliRunner(), ["sweep", "--pool", tmp_path / "nope.safetensors",
                                           "--out", tmp_path / "out"]), "--pool")
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke(CliRunner(), ["sweep", "--pool", tmp_path / "empty",
                                           "--out", tmp_path / "out"]), "--pool")


def test_a_rerun_with_the_cache_does_no_saliency_pass(pool_paths, tmp_path, passes):
    kw = dict(k=3, rules=["average"], attribution="saliency", num_samples=16, batch_size=8,
              cache_dir=str(tmp_path / "cache"))
    first = run_sweep(pool_paths, ["clean"], **kw)
    assert passes["loads"] == POOL
    again = run_sweep(pool_paths, ["clean"], **kw)
    assert passes["loads"] == POOL  # logits and the pool's Saliency Gram both came from the cache
    assert again["rows"] == first["rows"]
    reordered = run_sweep(pool_paths[::-1], ["clean"], **kw)
    assert passes["loads"] == POOL
    by_members = {frozenset(r["members"]): r["attribution_diversity"] for r in first["rows"]}
    for row in reordered["rows"]:
        assert row["attribution_diversity"] == pytest.approx(by_members[frozenset(row["members"])],
                                                             rel=1e-12)
