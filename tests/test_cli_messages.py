"""A bad command line is one line naming the key and what was expected; --help shows what this tool uses."""

from __future__ import annotations

import inspect

import pytest

from patchcore_lightning.cli import main
from patchcore_lightning.data.datamodule import AnomalyDataModule
from patchcore_lightning.module import PatchCoreModule

from .conftest import FIXTURE


def _one_line_error(capsys, args: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err  # no usage dump before it
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["test", "--data.rooot", "x"], "error: unknown option --data.rooot (did you mean --data.root?)"),
        (["test", "--model.modle_paths", "[m]"], "unknown option --model.modle_paths (did you mean --model.model_paths?)"),
        (["test", "--data.categories", "connector"],
         "error: --data.categories: 'connector' is not a list; write a list in brackets: --data.categories '[connector]'"),
        (["test", "--data.benchmark", "mvtecx"],
         "error: --data.benchmark: unknown value 'mvtecx'; choose one of mvtec_ad, mvtec_ad2, visa, mpdd, btad, folder "
         "(did you mean mvtec_ad?)"),
        (["test", "--data.batch_size", "two"], "error: --data.batch_size: invalid value 'two'; expected int or null"),
        (["test", "--trainer.gradient_clip_val", "1"],
         "error: --trainer.gradient_clip_val is a Lightning Trainer option this tool does not use"),
        (["validate"], "error: 'validate' is not a command of this tool; the commands are fit, test, predict, export: "
                       "thresholds come from test (thresholds.csv)"),
        (["tset"], "error: 'tset' is not a command of this tool; the commands are fit, test, predict, export"),
    ],
)
def test_a_bad_argument_is_one_line(capsys, args, expected):
    assert expected in _one_line_error(capsys, args)


def test_an_unknown_key_in_a_config_file_is_one_line(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  rooot: /data/mvtec\n")
    line = _one_line_error(capsys, ["test", "--config", str(config)])
    assert "unknown option --data.rooot (did you mean --data.root?)" in line


def test_model_count_mismatch_says_how_to_build_the_models(capsys, tmp_path, resnet18_weights):
    args = ["test", "--data.root", str(FIXTURE / "data"), "--data.categories", "[weave]",
            "--model.model_paths", f"[{FIXTURE / 'model'},{FIXTURE / 'model'}]", "--model.backbone_weights",
            str(resnet18_weights), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--results_dir", str(tmp_path)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert ("model.model_paths has 2 entries for 1 categories: give one folder per category, or exactly one for all, "
            "or --model.model_paths null to build each category's model from its train split first") in err, err


def _help(capsys, args: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_describes_this_tools_commands(capsys):
    out = _help(capsys, ["--help"])
    assert "Runs the full optimization routine" not in out and "validate" not in out
    flat = " ".join(out.split())
    assert "fit Build each category's memory bank from its train images" in flat
    assert "test Evaluate each category with its model folder" in flat
    assert "predict Score every image under data.predict_dir" in flat


@pytest.mark.parametrize("command", ["fit", "test", "predict"])
def test_command_help_is_complete_and_offers_no_training_options(capsys, command):
    out = _help(capsys, [command, "--help"])
    for unused in ("--optimizer", "--lr_scheduler", "gradient_clip", "accumulate_grad_batches", "limit_test_batches",
                   "max_epochs", "use_distributed_sampler", "--ckpt_path"):
        assert unused not in out, unused
    documented = [f"--model.{p}" for p in inspect.signature(PatchCoreModule.__init__).parameters if p != "self"]
    documented += [f"--data.{p}" for p in inspect.signature(AnomalyDataModule.__init__).parameters if p != "self"]
    documented += ["--results_dir", "--resume", "--config", "--print_config", "--trainer.accelerator",
                   "--trainer.devices", "--trainer.strategy", "--trainer.num_nodes", "--trainer.precision",
                   "--trainer.logger", "--trainer.callbacks", "--trainer.enable_progress_bar"]
    missing = [key for key in documented if key not in out]
    assert not missing, missing
