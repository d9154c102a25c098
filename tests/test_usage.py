"""A config that does not parse is said in a few lines: the key, where it came from, the
nearest valid keys (medlit.usage), instead of jsonargparse's 45-line usage."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from medlit.cli import build
from medlit.usage import UsageError

DEMO = str(Path(__file__).parents[1] / "experiments" / "demo" / "brats_unet.yaml")


def refusal(*args: str) -> str:
    with pytest.raises(UsageError) as caught:
        build([DEMO, *args], track=False)
    message = str(caught.value)
    assert "Union subtypes" not in message and "usage:" not in message
    assert len(message.splitlines()) <= 2
    return message


def test_a_mistyped_task_key_names_the_flag_and_the_nearest_key() -> None:
    message = refusal("--model.lrr=3")
    assert message.startswith(
        "unknown key model.lrr (from flag --model.lrr=3): did you mean model.lr?"
    )
    assert "python -m medlit.fit CONFIG --help" in message or "--help" in message


def test_a_mistyped_key_in_a_config_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("model:\n  init_args:\n    lrr: 3\ntrainer:\n  max_epochs: 2\n")
    assert f"unknown key model.lrr (from config file {bad})" in refusal("--config", str(bad))
    bad.write_text("trainer:\n  max_epoch: 3\n")
    message = refusal("--config", str(bad))
    assert f"unknown key trainer.max_epoch (from config file {bad})" in message
    assert "did you mean trainer.max_epochs" in message


def test_a_settings_group_key_and_a_key_without_its_group() -> None:
    assert "did you mean data.loader.batch_size" in refusal("--data.loader.batch_sizee=3")
    assert "data.loader.batch_size" in refusal("--data.batch_sise=3")  # the old flat key, mistyped
    assert "did you mean model.lr" in refusal("--modell.lr=3")


def test_a_bad_value_says_what_was_expected() -> None:
    message = refusal("--model.loss=dicee")
    assert message == (
        "model.loss=dicee (from flag --model.loss=dicee): choose one of dice_ce, dice, ce; "
        "did you mean dice?"
    )
    assert refusal("--trainer.max_epochs=abc") == (
        "trainer.max_epochs (from flag --trainer.max_epochs=abc): expected int"
    )
    assert "v>=0 and v<1" in refusal("--data.split.val_fraction=2")


def test_no_warning_about_args_beside_sys_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["fit.py", DEMO])  # as under python -m medlit.fit
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build([DEMO, "--trainer.max_epochs=1"], track=False)
    assert not [w for w in seen if "args parameter is intended" in str(w.message)]
