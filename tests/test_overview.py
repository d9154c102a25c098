"""``--help`` without a config: medlit's overview; ``--n-trials``; ``--print_completion``."""

from __future__ import annotations

import sys

import pytest

from medlit import datamodules, fit, overview, sweep, tasks
from medlit.datamodules.base import BaseDataModule
from medlit.tasks.base import BaseTask


def test_overview_lists_every_task_data_module_and_experiment() -> None:
    text = overview.overview("medlit.fit")
    assert "python -m medlit.fit CONFIG [--key=value ...]" in text
    # Every concrete class the packages export, found without a hand-kept list.
    for package, base in ((tasks, BaseTask), (datamodules, BaseDataModule)):
        concrete = [
            getattr(package, n)
            for n in package.__all__
            if isinstance(getattr(package, n), type)
            and issubclass(getattr(package, n), base)
            and getattr(package, n) is not base
        ]
        assert concrete
        for cls in concrete:
            assert f"{package.__name__}.{cls.__name__}" in text
    assert "Semantic segmentation with an SMP network." in text
    root = overview.experiments_dir()
    assert root is not None  # a checkout ships experiments/
    for path in root.rglob("*.yaml"):
        if "sweeps" not in path.relative_to(root).parts:
            assert overview.shown(path) in text
    assert "sweeps/" not in text
    assert "--model.help medlit.tasks.SegmentationTask" in text
    assert max(len(line) for line in text.splitlines()) <= overview.WIDTH


def test_each_command_has_its_own_usage() -> None:
    for command in overview.USAGE:
        text = overview.overview(command)
        assert f"usage:\n  python -m {command} " in text
        assert max(len(line) for line in text.splitlines()) <= overview.WIDTH
    swept = overview.overview("medlit.sweep")
    assert "experiments/sweeps/demo/brats_unet.yaml" in swept
    assert "--n-trials" in swept


def test_names_config() -> None:
    assert overview.names_config(["exp.yaml", "--help"])
    assert overview.names_config(["--config", "exp.yaml", "--help"])
    assert overview.names_config(["--ckpt_path=a.ckpt", "exp.yaml"])
    assert overview.names_config(["--ckpt_path", "a.ckpt", "exp.yaml", "--help"])
    assert not overview.names_config(["--help"])
    assert not overview.names_config(["--ckpt_path", "a.ckpt", "--help"])
    assert not overview.names_config(["--data", "BraTSDataModule", "-h"])


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_fit_help_without_config_prints_the_overview(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert fit.main(argv) == {}  # returns before anything is parsed or built
    out = capsys.readouterr().out
    assert out.startswith("Train, then test the best checkpoint, of one experiment.")
    assert "medlit.datamodules.BraTSDataModule" in out
    assert "experiments/demo/brats_unet.yaml" in out


def test_help_with_a_config_is_left_to_the_parser() -> None:
    assert not overview.maybe_overview("medlit.fit", ["experiments/demo/brats_unet.yaml", "-h"])
    assert not overview.maybe_overview("medlit.fit", ["--model.help", "SegmentationTask"])


def test_sweep_parser_takes_the_readme_spelling() -> None:
    help_text = sweep.parser().format_help()
    assert "--n-trials" in help_text and "--n_trials" in help_text
    for spelling in ("--n-trials", "--n_trials"):
        ns = sweep.parser().parse_args(
            ["--experiment", "experiments/demo/brats_unet.yaml", "--search_space", "{}"]
            + ["--objective.metric", "val/dice_mean", spelling, "7"]
        )
        assert ns.n_trials == 7


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_print_completion(
    shell: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `python -m medlit.fit` sets: the command's name comes from it.
    monkeypatch.setattr(sys, "argv", [fit.__file__, "--print_completion", shell])
    with pytest.raises(SystemExit) as exit_:
        fit.main(["--print_completion", shell])
    assert exit_.value.code == 0
    script = capsys.readouterr().out
    assert "--trainer.max_epochs" in script
    assert "--data.loader.batch_size" in script
    # A few hundred kB at most: --trainer.strategy's runaway expansion is cut off.
    assert len(script) < 1_000_000
    assert "_medlit_completers[medlit.fit]=_shtab_medlit_fit" in script
    assert ("complete -F _medlit_python python python3" in script) == (shell == "bash")
    assert ("compdef _medlit_python python python3" in script) == (shell == "zsh")
