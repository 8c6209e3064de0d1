"""The command line fails early and says what it means (issue 20): one test per reported
problem, reproduced as a user would meet it."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer

from conftest import FAST, SAMPLE, TEST_DATA, invoke
from mil_cli.cli import app


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


SAMPLE_LABELS = (SAMPLE / "labels.csv").read_text().replace("\r", "").splitlines()
BAD_LABELS = {
    "one class": "\n".join([SAMPLE_LABELS[0], *[r for r in SAMPLE_LABELS[1:] if r.endswith(",normal")]]),
    "ids of no slide": "\n".join([SAMPLE_LABELS[0], *[r.replace("slide_", "case_") for r in SAMPLE_LABELS[1:]]]),
    "too few per class": "slide_id,label\nslide_00,tumour\nslide_01,normal\nslide_02,normal",
    "wrong columns": "slide,diagnosis\nslide_00,tumour",
    "conflicting rows": "slide_id,label\nslide_00,tumour\nslide_00,normal\nslide_01,normal",
}
EXPECTED_REASON = {
    "one class": "only one class ('normal')",
    "ids of no slide": "none of its 20 slides is in the slides given (its ids: 'case_00'",
    "too few per class": "training needs at least 2 training slides of every class; found in the slides given: "
                         "normal: 2, tumour: 1",
    "wrong columns": "missing column(s) label, slide_id",
    "conflicting rows": "line 3: slide 'slide_00' appears twice with different values",
}


@pytest.mark.parametrize("problem", sorted(BAD_LABELS))
def test_run_with_bad_labels_fails_in_seconds_and_writes_nothing(problem: str, tmp_path: Path) -> None:
    """Point 1: checked before tiling, in a real process (imports included), in seconds."""
    labels = tmp_path / "labels.csv"
    labels.write_text(BAD_LABELS[problem] + "\n")
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mil_cli.cli", "run", str(SAMPLE / "slides"), "--labels",
                           str(labels), "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2
    assert EXPECTED_REASON[problem] in one_error_line(proc.stderr)
    assert seconds < 20, f"{seconds:.1f} s"  # ~3 s unloaded (importing torch); tiling alone takes ~20 s
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_run_with_more_folds_than_slides_of_a_class_fails_before_tiling(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("run", SAMPLE / "slides", "--labels", SAMPLE / "labels.csv", "--out", out, "--folds", "11")
    assert result.exit_code == 2 and not out.exists()
    assert ("11-fold cross-validation needs at least 11 training slides of every class; found in the slides "
            "given: normal: 10, tumour: 10") in one_error_line(result.stderr)


def test_run_without_backbone_weights_fails_before_tiling(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "run"
    result = invoke("run", SAMPLE / "slides", "--labels", SAMPLE / "labels.csv", "--out", out,
                    "--backbone", "resnet50-trunc", "--device", "cpu")
    assert result.exit_code == 2
    assert "resnet50-trunc: ImageNet weights not found" in one_error_line(result.stderr)
    result = invoke("run", SAMPLE / "slides", "--labels", SAMPLE / "labels.csv", "--out", out,
                    "--weights", tmp_path / "nope.pth", "--device", "cpu")
    assert result.exit_code == 2 and "nope.pth: weight file not found" in result.stderr
    (tmp_path / "notes.pth").write_text("these are not weights")
    result = invoke("run", SAMPLE / "slides", "--labels", SAMPLE / "labels.csv", "--out", out,
                    "--weights", tmp_path / "notes.pth", "--device", "cpu")
    assert result.exit_code == 2 and "notes.pth: not a loadable weight file" in one_error_line(result.stderr)
    assert not out.exists()


def test_predict_refuses_labels_of_classes_the_model_does_not_know(sample_run: Path, tmp_path: Path) -> None:
    """Point 2: it used to exit 0 and mark every such slide correct=false."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nslide_00,benign\nslide_01,benign\nslide_02,tumour\n")
    result = invoke("predict", "--model", sample_run / "model.pt", "--features", sample_run / "feats.h5",
                    "--labels", labels, "--out", tmp_path / "p.csv", "--device", "cpu")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "label(s) 'benign' (2 slides) are not classes of the model (normal, tumour)" in line
    assert not (tmp_path / "p.csv").exists()


def rendered_help(*args: str) -> str:
    result = invoke(*args, "--help")
    assert result.exit_code == 0
    return result.stdout


def test_help_shows_flags_without_values_and_usage_as_typed() -> None:
    """Point 3: no <bool> placeholder on flags (users typed `--previews true`), usage lines with
    SLIDES... instead of {inputs}..., one meaning of --workers, run exposing its stages' options."""
    usage = {}
    for command in ("tile", "embed", "train", "predict", "explain", "run", "info"):
        text = rendered_help(command)
        usage[command] = next(line.strip() for line in text.splitlines() if "Usage:" in line)
        assert "<bool>" not in text and "{" not in usage[command], command
    assert "<bool>" not in rendered_help()
    assert usage["tile"].endswith("tile [OPTIONS] SLIDES...")  # the test runner calls the program "root"
    assert usage["run"].endswith("run [OPTIONS] SLIDES...")
    assert usage["explain"].endswith("explain [OPTIONS] [SLIDE_ID...]")

    by_name = typer.main.get_command(app).commands  # the click commands typer built
    workers_help = {name: next(p.help for p in by_name[name].params if p.name == "workers")
                    for name in ("tile", "embed", "run")}
    assert len(set(workers_help.values())) == 1, workers_help
    run_options = {opt for p in by_name["run"].params for opt in p.opts}
    assert {"--previews", "--folds", "--model", "--stride", "--max-patches", "--ensemble", "--config"} <= run_options
    for name, cmd in by_name.items():  # the first paragraph is one line: no break inside a sentence
        assert "\n" not in (cmd.help or "").strip().split("\n\n")[0], name

    typed = invoke("tile", SAMPLE / "slides", "--previews", "true", "--out", "never.h5")
    assert typed.exit_code == 2 and "write --previews, not --previews true" in one_error_line(typed.stderr)


def test_options_file_sets_defaults_and_the_command_line_wins(embedded_subset: Path) -> None:
    options = embedded_subset / "train.toml"
    options.write_text("epochs = 3\nensemble = 1\nstandardise = \"pooled\"\nhidden-dim = 32\n")
    result = invoke("train", "--config", options, "--epochs", "2", "--device", "cpu", "--out", "m.pt",
                    cwd=embedded_subset)
    assert result.exit_code == 0, result.stderr
    config = torch.load(embedded_subset / "m.pt", weights_only=True)["config"]
    assert config["training"]["epochs"] == 2 and config["training"]["ensemble"] == 1
    assert config["training"]["standardise"] == "pooled" and config["model"]["hidden_dim"] == 32

    options.write_text("epoch = 3\n")
    result = invoke("train", "--config", options, "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2 and "train.toml: unknown option 'epoch' for `milcli train`" in one_error_line(result.stderr)
    options.write_text("epochs = \"many\"\n")
    result = invoke("train", "--config", options, "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2 and "train.toml: epochs: Invalid value" in one_error_line(result.stderr)
    options.write_text("[train]\nepochs = 3\n")
    result = invoke("train", "--config", options, "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2 and "sections are not used" in result.stderr


def test_messages_speak_of_the_file_not_the_library(sample_run: Path, tmp_path: Path) -> None:
    """Point 4: no `pop from empty list`, no `index 0 out of range(0)`, no empty table."""
    result = invoke("predict", "--model", SAMPLE / "labels.csv", "--features", sample_run / "feats.h5")
    line = one_error_line(result.stderr)
    assert result.exit_code == 2 and "labels.csv: not a model file" in line and "pop from" not in line

    model = (sample_run / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(model[: len(model) // 2])
    result = invoke("predict", "--model", tmp_path / "cut.pt", "--features", sample_run / "feats.h5")
    assert result.exit_code == 2 and "cut.pt: not a loadable milcli model: the file is damaged or truncated" in result.stderr

    slide = (TEST_DATA / "CMU-1-Small-Region.svs").read_bytes()
    (tmp_path / "cut.svs").write_bytes(slide[: len(slide) // 2])
    (tmp_path / "notes.svs").write_text("not a slide")
    result = invoke("info", tmp_path / "cut.svs", tmp_path / "notes.svs")
    assert result.exit_code == 1
    assert "cut.svs: a TIFF file whose image directory cannot be read: it is truncated or damaged" in result.stderr
    assert "notes.svs: not a TIFF file" in result.stderr
    assert "out of range" not in result.stderr and "┏" not in result.output  # no table without rows


def test_json_on_failure_says_why_on_stdout(tmp_path: Path) -> None:
    """Point 5: exit 2 with --json prints {"ok": false, "error": ..., "file": ...}."""
    result = invoke("train", "--labels", tmp_path / "labels.csv", "--features", SAMPLE / "labels.csv", "--json")
    assert result.exit_code == 2
    failure = json.loads(result.stdout)
    assert failure["ok"] is False and failure["command"] == "train"
    assert failure["file"] == str(tmp_path / "labels.csv") and "no such file" in failure["error"]

    result = invoke("tile", tmp_path, "--patch-size", "big", "--json")
    assert result.exit_code == 2
    failure = json.loads(result.stdout)
    assert failure["ok"] is False and "--patch-size" in failure["error"]


def test_run_on_missing_slides_leaves_no_folder(tmp_path: Path) -> None:
    """Point 6: `run /no/slides --out r1` used to leave an empty r1/."""
    result = invoke("run", tmp_path / "no" / "slides", "--labels", SAMPLE / "labels.csv", "--out", tmp_path / "r1")
    assert result.exit_code == 2 and "slides: no such file or folder" in one_error_line(result.stderr)
    assert not (tmp_path / "r1").exists()
    (tmp_path / "empty").mkdir()
    result = invoke("run", tmp_path / "empty", "--labels", SAMPLE / "labels.csv", "--out", tmp_path / "r1")
    assert result.exit_code == 2 and "no slide files found" in result.stderr and not (tmp_path / "r1").exists()


def test_run_without_explain_does_not_promise_explain(sample_subset: Path) -> None:
    result = invoke("run", "slides", "--out", "r", "--no-explain", *FAST, "--epochs", "1", "--ensemble", "1",
                    "--device", "cpu", "--workers", "0", cwd=sample_subset)
    assert result.exit_code == 0, result.stderr
    assert "explain/" not in result.stderr and not (sample_subset / "r" / "explain").exists()
    assert "(predictions.csv, model.pt, run.json, roc.png)" in result.stderr
    assert (sample_subset / "r" / "roc.png").is_file()


def test_offline_backbone_is_one_line_in_under_a_second(sample_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Point 6: the hub is unreachable (a closed local port stands for no network), the cache empty."""
    from huggingface_hub import constants

    importlib.import_module("timm")  # imported before timing: the bound is on the hub check, not on imports
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    args = ["embed", sample_run / "tiles.h5", "--out", tmp_path / "f.h5", "--backbone", "timm:resnet18", "--device", "cpu"]
    result = invoke(*args)  # without --download nothing is fetched: the cache is all there is
    line = one_error_line(result.stderr)
    assert result.exit_code == 2
    assert "timm:resnet18: timm/resnet18.a1_in1k/model.safetensors is not in the Hugging Face cache" in line
    assert "--download" in line and "--weights FILE" in line
    start = time.perf_counter()
    result = invoke(*args, "--download")
    seconds = time.perf_counter() - start
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "the hub cannot be reached (offline)" in line and "--weights FILE" in line
    assert seconds < 1, f"{seconds:.2f} s"
    assert not (tmp_path / "f.h5").exists()  # a run that wrote no slide leaves no store behind


def test_train_refuses_when_few_labelled_slides_are_in_the_store(embedded_subset: Path) -> None:
    """Point 6: 22 labels, 20 of them missing from the store, used to train on the other 2."""
    ghosts = [f"ghost_{i},{'tumour' if i % 2 else 'normal'}" for i in range(20)]
    (embedded_subset / "labels.csv").write_text("\n".join(["slide_id,label", "slide_00,tumour", "slide_01,normal",
                                                           *ghosts]) + "\n")
    result = invoke("train", "--epochs", "1", "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2
    assert ("training needs at least 2 training slides of every class; found in feats.h5: normal: 1, tumour: 1 "
            "(2 of its 22 slides)") in one_error_line(result.stderr)
    assert not (embedded_subset / "model.pt").exists()


def test_version_and_shell_completion() -> None:
    """Point 7's companions: `milcli --version` and completion that really completes."""
    import os

    from mil_cli import __version__

    assert invoke("--version").stdout.strip() == f"milcli {__version__}"
    assert "--install-completion" in rendered_help()
    env = {**os.environ, "_MILCLI_COMPLETE": "complete_bash", "COMP_WORDS": "milcli train --ens", "COMP_CWORD": "2"}
    proc = subprocess.run([sys.executable, "-c", "from mil_cli.cli import app; app(prog_name='milcli')"],
                          env=env, capture_output=True, text=True)
    assert proc.stdout.split() == ["--ensemble"], proc.stderr
