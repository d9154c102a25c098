"""The ``medlit`` console script: ``medlit <command> ...`` is ``python -m medlit.<command>
...``, with the same arguments, output and exit status."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)


def test_the_package_installs_the_medlit_command() -> None:
    [script] = entry_points(group="console_scripts", name="medlit")
    assert script.value == "medlit.__main__:main"


def test_it_lists_the_commands_and_refuses_an_unknown_one() -> None:
    listed = run("-m", "medlit")
    assert listed.returncode == 0
    for name in ("fit", "cv", "sweep", "check", "evaluate", "predict", "generate", "tracking"):
        assert f"\n  {name} " in listed.stdout
    assert "Train, then test the best checkpoint" in listed.stdout
    unknown = run("-m", "medlit", "train")
    assert unknown.returncode == 2 and "no command 'train'" in unknown.stderr


def test_a_command_runs_as_its_module_does() -> None:
    args = ["experiments/demo/brats_unet.yaml", "--data.root=/nonexistent", "--data.demo=false"]
    via_command = run("-m", "medlit", "check", *args)
    via_module = run("-m", "medlit.check", *args)
    assert via_command.returncode == via_module.returncode == 2
    last = [p.stderr.strip().splitlines()[-1] for p in (via_command, via_module)]
    assert last[0] == last[1] and "BraTS root /nonexistent does not exist" in last[0]


def test_a_command_exits_with_its_status_after_what_a_normal_exit_does(tmp_path: Path) -> None:
    """Commands end through ``exit_process`` (no interpreter finalisation, seconds after a
    run): a non-daemon thread still finishes, an idle executor's worker is told to stop
    (joining it without that hung a medlit.cv run), ``atexit`` handlers run, and what was
    printed without a newline or a flush reaches the pipe."""
    script = f"""
import atexit, pathlib, threading, time, sys
from medlit.errors import exit_process
out = pathlib.Path({str(tmp_path)!r})
def late():
    time.sleep(0.3)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
# An idle executor worker (a non-daemon thread: MLflow's artifact uploads) ends too.
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # kept alive, as MLflow keeps its pool
pool.submit(time.sleep, 0.1)
atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
print("buffered", end="")
sys.stderr.write("to stderr")
exit_process(3)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 3
    assert (done.stdout, done.stderr) == ("buffered", "to stderr")
    assert (tmp_path / "atexit").read_text() == "True"  # after the thread had ended
