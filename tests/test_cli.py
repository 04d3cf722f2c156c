"""The command line: results on stdout, one-line errors naming the argument, never a traceback.

Commands run in-process with Click's CliRunner (Click >= 8.2 keeps stderr apart: ``result.stdout``,
``result.stderr``; ``result.output`` interleaves both); the two entry points run once for real.
Members have random weights (``create_member``), which is instant.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli_helpers import assert_user_error, invoke

from divfast.data import load_members, save_member
from divfast.data.members import create_member
from divfast.ensembles import evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two 10-class members, one 5-class member and a file of random bytes."""
    d = tmp_path_factory.mktemp("cli-members")
    for name, classes, seed in [("a", 10, 0), ("b", 10, 1), ("five", 5, 2)]:
        torch.manual_seed(seed)
        save_member(create_member("resnet10t", classes), str(d / f"{name}.safetensors"))
    (d / "junk.safetensors").write_bytes(os.urandom(128))
    return {p.stem: str(p) for p in d.iterdir()}


@pytest.fixture
def runner():
    return CliRunner()





# --- entry points ------------------------------------------------------------------------------


def test_console_script_help():
    exe = Path(sys.executable).parent / "divfast"
    assert exe.exists(), f"console script not installed at {exe}"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("eval", "train", "info", "demo"):
        assert command in out.stdout


def test_python_m_help():
    out = subprocess.run([sys.executable, "-m", "divfast.cli", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "Usage: divfast" in out.stdout and "eval" in out.stdout


def test_help_does_not_import_torch():
    code = "import sys; import divfast.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_version(runner):
    import divfast

    result = invoke(runner, ["--version"])
    assert result.exit_code == 0
    assert divfast.__version__ in result.stdout


def test_subcommand_help(runner):
    for command in ("eval", "train", "info", "demo"):
        result = invoke(runner, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.stdout


# --- info --------------------------------------------------------------------------------------


def test_info_json(runner):
    result = invoke(runner, ["info", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert {"extension_loaded", "kernels", "built", "torch", "divfast", "device"} <= set(facts)
    assert isinstance(facts["extension_loaded"], bool)
    assert {"torch_version", "with_cuda", "cuda_archs"} <= set(facts["built"])
    assert facts["kernels"] and all(set(v) == {"cpu", "cuda"} for v in facts["kernels"].values())
    if os.environ.get("DIVFAST_REQUIRE_EXTENSION") == "1":
        assert facts["extension_loaded"] is True
        assert all(v["cpu"] for v in facts["kernels"].values())


def test_info_text(runner):
    result = invoke(runner, ["info"])
    assert result.exit_code == 0
    assert "extension_loaded:" in result.stdout and "kernels:" in result.stdout


# --- eval --------------------------------------------------------------------------------------


def test_eval_json_and_report_file(runner, ckpts, tmp_path):
    members = f"{ckpts['a']},{ckpts['b']}"
    out = tmp_path / "out"
    result = invoke(runner, ["eval", "--members", members, "--dataset", "clean", "--json",
                             "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --no-progress: nothing on stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "divfast.eval/1"
    assert report["dataset"] == "clean" and report["n_samples"] == 540
    assert report["member_files"] == [ckpts["a"], ckpts["b"]]
    assert [m["name"] for m in report["members"]] == ["a", "b"]
    assert sorted(os.listdir(out)) == ["attributions.png", "report.json"]  # the Saliency grid
    on_disk = json.loads((out / "report.json").read_text())
    # NaN != NaN, so compare canonical text
    assert json.dumps(on_disk, sort_keys=True) == json.dumps(report, sort_keys=True)

    # the command is a thin layer: the library gives the same report
    lib = evaluate(load_members([ckpts["a"], ckpts["b"]]), _digits_test(), "clean",
                   progress=False)
    lib["member_files"] = report["member_files"]
    assert json.dumps(lib, sort_keys=True) == json.dumps(report, sort_keys=True)


def _digits_test():
    from divfast.data import digits_dataset

    return digits_dataset("test")


def test_eval_table(runner, ckpts, tmp_path):
    result = invoke(runner, ["eval", "--members", f"{ckpts['a']},{ckpts['b']}", "--no-progress",
                             "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "ensemble" in text and "disagreement" in text
    assert "resnet10t" in text and "gain over best member" in text
    assert f"wrote {tmp_path / 'report.json'}" in text
    assert (tmp_path / "report.json").is_file()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_eval_progress_goes_to_stderr(runner, ckpts):
    result = invoke(runner, ["eval", "--members", ckpts["a"], "--json", "--batch-size", "256"])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the bar never pollutes stdout


@pytest.mark.parametrize("args, flag", [
    (["eval", "--members", "{missing}"], "--members"),
    (["eval", "--members", "{a},{missing}"], "--members"),
    (["eval", "--members", "{a},{five}"], "--members"),
    (["eval", "--members", "{junk}"], "--members"),
    (["eval", "--members", "{dir}"], "--members"),
    (["eval", "--members", ","], "--members"),
    (["eval", "--members", "{a}", "--dataset", "nope"], "--dataset"),
    (["eval", "--members", "{a}", "--data", "{missing}"], "--data"),
    (["eval", "--members", "{a}", "--batch-size", "0"], "--batch-size"),
    (["eval", "--members", "{a}", "--batch-size", "-1"], "--batch-size"),
    (["eval", "--members", "{a}", "--batch-size", "abc"], "--batch-size"),
    (["eval"], "--members"),
    (["train", "--loss", "nope", "--out", "{out}"], "--loss"),
    (["train", "--epochs", "0", "--out", "{out}"], "--epochs"),
    (["train", "--batch-size", "0", "--out", "{out}"], "--batch-size"),
    (["train", "--batch-size", "99999", "--out", "{out}"], "--batch-size"),
    (["train", "--lr", "0", "--out", "{out}"], "--lr"),
    (["train", "--members", "resnet10t", "--arch", "resnet10t", "--out", "{out}"], "--arch"),
    (["train", "--arch", "resnet10t", "--num-members", "0", "--out", "{out}"], "--num-members"),
    (["train", "--workers", "-1", "--out", "{out}"], "--workers"),
    (["train", "--data", "{missing}", "--out", "{out}"], "--data"),
    (["train", "--val-data", "{dir}", "--out", "{out}"], "--val-data"),
    (["eval", "--members", "{a}", "--workers", "-1"], "--workers"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_input_is_one_line_error(runner, ckpts, tmp_path, args, flag):
    paths = dict(ckpts, missing=str(tmp_path / "missing.safetensors"),
                 dir=str(tmp_path), out=str(tmp_path / "run"))
    result = invoke(runner, [a.format(**paths) for a in args])
    assert_user_error(result, flag)
    if args[0] == "train":
        assert not (tmp_path / "run").exists()  # refused before writing anything


def test_eval_cuda_without_gpu(runner, ckpts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke(runner, ["eval", "--members", ckpts["a"], "--device", "cuda"])
    assert_user_error(result, "--device")


def test_eval_error_names_the_bad_file(runner, ckpts, tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    result = invoke(runner, ["eval", "--members", f"{ckpts['a']},{missing}"])
    assert missing in result.stderr
    result = invoke(runner, ["eval", "--members", f"{ckpts['a']},{ckpts['five']}"])
    assert ckpts["five"] in result.stderr


def test_eval_unknown_device(runner, ckpts):
    result = invoke(runner, ["eval", "--members", ckpts["a"], "--device", "foo"])
    assert_user_error(result, "--device")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_out_is_a_file(runner, ckpts, tmp_path, command):
    f = tmp_path / "taken"
    f.write_text("x")
    if command == "eval":
        args = ["eval", "--members", ckpts["a"], "--no-progress", "--out", str(f)]
    else:
        args = ["train", "--arch", "resnet10t", "--num-members", "1", "--epochs", "1",
                "--out", str(f)]
    assert_user_error(invoke(runner, args), "--out")


def test_train_unknown_architecture(runner, tmp_path):
    result = invoke(runner, ["train", "--members", "resnet10t,no_such_net", "--epochs", "1",
                             "--out", str(tmp_path / "run")])
    assert_user_error(result, "--members")


def test_eval_metadata_not_an_object(runner, ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "odd.safetensors")
    save_file(load_file(ckpts["a"]), path, metadata={"divfast": "[1, 2]"})
    assert_user_error(invoke(runner, ["eval", "--members", path]), "--members")


# --- train -------------------------------------------------------------------------------------


def test_train_writes_checkpoints_and_refuses_a_different_run(runner, tmp_path):
    """One full-batch step of one member: the cheapest real run of the command."""
    out = tmp_path / "run"
    args = ["train", "--arch", "resnet10t", "--num-members", "1", "--epochs", "1",
            "--batch-size", "1257", "--out", str(out), "--device", "cpu", "--no-progress"]
    result = invoke(runner, args)
    assert result.exit_code == 0, result.output
    path = str(out / "member0-resnet10t.safetensors")
    assert result.stdout.splitlines() == [path]
    assert json.loads((out / "run.json").read_text())["status"] == "done"

    result = invoke(runner, args + ["--seed", "1"])
    assert_user_error(result, "--overwrite")
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 0

    # the checkpoint evaluates
    result = invoke(runner, ["eval", "--members", path, "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["members"][0]["architecture"] == "resnet10t"


def _image_folder(root: Path, classes=("cat", "dog"), per_class=3, size=(40, 50)):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            px = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(px.numpy()).save(root / c / f"{i}.png")
    return root


def test_train_and_eval_on_an_image_folder(runner, tmp_path):
    """`train --data` takes an ImageFolder: classes from its folders, crops at --image-size, and the
    checkpoints evaluate on the same folder with `eval --data`."""
    data = _image_folder(tmp_path / "folder")
    out = tmp_path / "run"
    result = invoke(runner, ["train", "--arch", "resnet10t", "--num-members", "2", "--epochs", "1",
                             "--batch-size", "3", "--data", str(data), "--image-size", "32",
                             "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert len(paths) == 2
    members = load_members(paths)
    assert all(m.info.num_classes == 2 and m.info.input_size == (3, 32, 32) for m in members)
    assert members[0].info.provenance["dataset"] == str(data)
    result = invoke(runner, ["eval", "--members", ",".join(paths), "--data", str(data), "--json",
                             "--no-progress", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_samples"] == 6 and report["num_classes"] == 2


def test_train_val_data_must_share_classes(runner, tmp_path):
    data = _image_folder(tmp_path / "a")
    other = _image_folder(tmp_path / "b", classes=("x", "y", "z"))
    result = invoke(runner, ["train", "--data", str(data), "--val-data", str(other),
                             "--image-size", "32", "--out", str(tmp_path / "run")])
    assert_user_error(result, "--val-data")


# --- README ------------------------------------------------------------------------------------


def _quick_start_code(readme: str) -> str | None:
    """The first ```python block after a heading that contains "Quick start"."""
    heading = re.search(r"^#+[^\n]*quick ?start[^\n]*$", readme, flags=re.IGNORECASE | re.MULTILINE)
    if heading is None:
        return None
    block = re.search(r"^```python[^\n]*\n(.*?)^```", readme[heading.end():],
                      flags=re.DOTALL | re.MULTILINE)
    return block.group(1) if block else None


def test_readme_quick_start_runs(tmp_path):
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing: the quick start cannot be executed"
    code = _quick_start_code(readme.read_text(encoding="utf-8"))
    assert code, 'README.md has no ```python block under a "Quick start" heading'
    script = tmp_path / "quick_start.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=env)
    assert out.returncode == 0, f"README quick start failed:\n{out.stdout}\n{out.stderr}"


def test_readme_other_python_blocks_run(tmp_path):
    """Every other ```python block of the README runs too: documentation that runs cannot drift."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    quick = _quick_start_code(text)
    others = [b for b in blocks if b != quick]
    assert others, "expected the corruptions example besides the quick start"
    script = tmp_path / "blocks.py"
    script.write_text("\n".join(others), encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, f"README example failed:\n{out.stdout}\n{out.stderr}"
