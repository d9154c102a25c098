"""``medlit.cv``: k folds of one experiment under one MLflow parent run, every non-test
case predicted once out of fold, and a killed cross-validation continued by the same
command (finished folds not trained again, the interrupted one from its last.ckpt)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import SimpleITK as sitk

from medlit.cv import plan
from medlit.datasets.luna16.phantom import write_luna16
from medlit.errors import ConfigError
from medlit.postprocessing import Postprocessing
from tests.test_fit import tiny

REPO = Path(__file__).resolve().parents[1]


def cv_command(root: Path, uri: str, *extra: str) -> list[str]:
    """The tiny 2.5D U-Net on the 8-case BraTS fixture (2 test cases, 3 folds of 2)."""
    return [
        sys.executable,
        "-m",
        "medlit.cv",
        *tiny(root, uri, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"),
        "--num_folds=3",
        *extra,
    ]


def children(client: mlflow.MlflowClient, role: str) -> dict[int, mlflow.entities.Run]:
    exp = client.get_experiment_by_name("test")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.`medlit.cv.role` = '{role}'")
    return {int(r.data.tags["fold"]): r for r in runs}


def test_folds_partition_the_non_test_cases_and_luna16_folds_are_its_subsets(
    brats_root: Path, tracking_uri: str, tmp_path: Path
) -> None:
    folds = plan(tiny(brats_root, tracking_uri)[:], 3)
    assert len(folds.folds) == 3 and len(folds.test) == 2
    vals = [c for f in folds.folds for c in f.val]
    assert len(vals) == len(set(vals)) == 6 and not set(vals) & set(folds.test)
    for f in folds.folds:
        assert sorted(f.train) == sorted(set(vals) - set(f.val))
    table = folds.table()
    assert sorted(table["fold"].unique()) == ["0", "1", "2", "test"]
    split = tmp_path / "split.yaml"
    split.write_text("train: [x]\n")
    with pytest.raises(ConfigError, match="split_file.*fixes one split"):
        plan([*tiny(brats_root, tracking_uri), f"--data.split.split_file={split}"], 3)
    # LUNA16: one fold per subset that trains or validates; num_folds does not re-split
    luna = tmp_path / "LUNA16"
    write_luna16(luna, 10, seed=1, shape_range=((16, 20), (40, 40), (40, 40)))
    args = [
        str(REPO / "experiments/demo/luna16_lungs_unet.yaml"),
        f"--data.root={luna}",
        "--data.demo=false",
        f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
    ]
    subsets = plan(args, 5)  # the demo config: val [8], test [9, 7]
    assert [f.overrides[1] for f in subsets.folds] == [
        f"--data.split.val=[{s}]" for s in (0, 1, 2, 3, 4, 5, 6, 8)
    ]
    assert all(len(f.val) == 1 for f in subsets.folds) and len(subsets.test) == 2


@pytest.mark.slow
def test_a_killed_cross_validation_continues_where_it_stopped(
    brats_root: Path, tracking_uri: str, tmp_path: Path
) -> None:
    """SIGKILL while fold 2 trains (after its first epoch's last.ckpt); the same command
    again trains neither fold 0 nor 1, continues fold 2 in its own run, predicts every
    non-test case once out of fold and finishes the parent run with the summary."""
    client = mlflow.MlflowClient(tracking_uri)
    cmd = cv_command(brats_root, tracking_uri)
    ckpts_root = Path(tracking_uri.removeprefix("sqlite:///")).parent
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        victim = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and victim.poll() is None:
            fold2 = children(client, "fold").get(2)
            if fold2 is not None:
                last = ckpts_root / fold2.info.experiment_id / fold2.info.run_id / "checkpoints"
                if (last / "last.ckpt").is_file():
                    victim.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.1)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    before = children(client, "fold")
    assert before[0].info.status == before[1].info.status == "FINISHED"
    assert before[2].info.status == "RUNNING"  # SIGKILL: nobody ended it
    pid = json.loads(before[2].data.tags.get("medlit.owner", "{}")).get("pid")
    for _ in range(100):  # the fold's own process died with the command (PDEATHSIG)
        if pid is None or not _alive(pid):
            break
        time.sleep(0.1)
    second = subprocess.run(cmd, capture_output=True, text=True)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "fold 0 of 3: finished before" in out and "fold 1 of 3: finished before" in out
    assert f"continuing run {before[2].info.run_id} from" in out
    after = children(client, "fold")
    assert {f: r.info.run_id for f, r in after.items()} == {
        f: r.info.run_id for f, r in before.items()
    }
    for f in (0, 1):  # not touched again
        assert after[f].info.end_time == before[f].info.end_time
    assert after[2].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(after[2].info.run_id, "val/dice_mean")]
    assert sorted(steps) == sorted(set(steps)) and len(steps) == 2  # each epoch once
    [parent] = client.search_runs([after[0].info.experiment_id], "tags.`medlit.cv.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["medlit.cv.folds_done"] == "0,1,2"
    oof = children(client, "oof")
    assert sorted(oof) == [0, 1, 2] and all(r.info.status == "FINISHED" for r in oof.values())
    for r in (*after.values(), *oof.values()):
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    art = tmp_path / "parent"
    client.download_artifacts(parent.info.run_id, "", str(art))
    folds = pd.read_csv(art / "folds.csv", dtype=str)
    per_case = pd.read_csv(art / "cv_per_case.csv", dtype={"case_id": str})
    held = folds[folds["fold"] != "test"].set_index("case_id")["fold"].astype(int)
    assert sorted(per_case["case_id"]) == sorted(held.index)  # each non-test case once
    assert (per_case.set_index("case_id")["fold"] == held[per_case["case_id"]].values).all()
    summary = pd.read_csv(art / "cv_summary.csv")
    by = summary.set_index(["metric", "across"])
    assert by.loc[("val/dice_mean", "folds"), "n"] == 3
    assert by.loc[("test/dice_mean", "folds"), "n"] == 3
    assert by.loc[("dice_WT", "cases"), "n"] == 6
    # the fold mean of the out-of-fold Dice is the mean of the three runs' values
    values = [oof[f].data.metrics["val/dice_mean"] for f in range(3)]
    assert by.loc[("val/dice_mean", "folds"), "mean"] == pytest.approx(sum(values) / 3)
    assert parent.data.metrics["cv/val/dice_mean_mean"] == pytest.approx(sum(values) / 3)
    # the cases' mean Dice is that of the per-case table (what each fold predicted)
    assert by.loc[("dice_WT", "cases"), "mean"] == pytest.approx(per_case["dice_WT"].mean())

    # The postprocessing chosen on the out-of-fold cases' regions (one file per case)
    steps = pd.read_csv(art / "postprocessing.csv")
    assert list(steps["region"][:4]) == ["all foreground", "WT", "WT", "TC"]
    chosen = Postprocessing.read(art / "postprocessing.json")
    assert parent.data.tags["medlit.cv.postprocessing"] == chosen.describe()
    kept = sorted(p.stem for p in ckpts_root.glob("*/*/oof_regions/*.npz"))
    assert kept == sorted(held.index)
    # The folds' ensemble scores the fixed test split in a child run of the parent ...
    from medlit.evaluate import main as evaluate
    from medlit.predict import main as predict

    experiment = cmd[3:-1]  # the experiment's arguments, without --num_folds
    ensemble = evaluate([*experiment, f"--cv_run={parent.info.run_id}", "--split=test"])
    [run] = client.search_runs([parent.info.experiment_id], "tags.`medlit.cv.role` = 'ensemble'")
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["evaluate.members"] == "3"
    assert run.data.params["evaluate.postprocessing"] == chosen.describe()
    per_test = pd.read_csv(client.download_artifacts(run.info.run_id, "test_per_case.csv"))
    assert sorted(per_test["case_id"].astype(str)) == sorted(folds[folds["fold"] == "test"].case_id)
    parent_metrics = client.get_run(parent.info.run_id).data.metrics
    assert parent_metrics["ensemble/test/dice_mean"] == pytest.approx(ensemble["test/dice_mean"])
    # ... as the same three checkpoints given by path do
    ckpts = [
        ckpts_root / r.info.experiment_id / r.info.run_id / "checkpoints" / "last.ckpt"
        for r in (after[f] for f in range(3))
    ]
    by_path = evaluate(
        [
            *experiment,
            *(f"--ckpt_path={c}" for c in ckpts),
            "--split=test",
            f"--postprocessing={art / 'postprocessing.json'}",
        ]
    )
    assert by_path == pytest.approx(ensemble)
    # and predicts new cases with every fold's model
    case = next(p for p in sorted(brats_root.iterdir()) if p.name.startswith("BraTS"))
    written = predict(
        [
            *experiment,
            f"--cv_run={parent.info.run_id}",
            f"--input={case}",
            f"--output={tmp_path / 'p'}",
            "--uncertainty=variance",
        ]
    )
    assert [w.name for w in written] == [f"{case.name}.nii.gz", f"{case.name}_uncertainty.nii.gz"]
    # the members' disagreement per voxel, on the input's exact grid
    flair = sitk.ReadImage(str(next(case.glob("*flair.nii.gz"))))
    umap = sitk.ReadImage(str(written[1]))
    assert umap.GetSize() == flair.GetSize() and umap.GetOrigin() == flair.GetOrigin()
    values = sitk.GetArrayFromImage(umap)
    assert values.min() >= 0 and values.max() <= 0.25 and values.max() > 0
    volumes = pd.read_csv(tmp_path / "p" / "volumes.csv").set_index("case_id")
    # (the map's mean over the case's crop; the file is 0 outside it)
    assert volumes.loc[case.name, "variance_mean"] >= values.mean() > 0
    assert "variance_mean_foreground" in volumes
    # A fold whose out-of-fold regions are gone is evaluated again, not retrained
    gone = next(ckpts_root.glob(f"*/{oof[1].info.run_id}/oof_regions"))
    shutil.rmtree(gone)
    third = subprocess.run(cmd, capture_output=True, text=True)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert "kept no out-of-fold regions" in third.stderr
    assert "fold 1 of 3: finished before" in third.stderr
    assert sorted(p.stem for p in ckpts_root.glob("*/*/oof_regions/*.npz")) == kept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_classifier_cross_validates_and_its_folds_ensemble(
    tmp_path: Path, tracking_uri: str
) -> None:
    """ISIC 2019, 3 folds of one epoch: every non-test image predicted once out of fold
    (the pooled balanced accuracy on the parent), the folds' ensemble on the test split,
    and per-image entropy from it."""
    from medlit.cv import main as cv
    from medlit.evaluate import main as evaluate
    from medlit.predict import main as predict
    from tests.data.isic.data import make_isic
    from tests.test_fit import tiny_classifier

    root = tmp_path / "isic"
    make_isic(root, "2019", lesions=24, seed=4)
    args = tiny_classifier(root, tracking_uri, "--model.log_images=false", "--trainer.max_epochs=1")
    summary = cv([*args, "--num_folds=3"]).set_index(["metric", "across"])
    client = mlflow.MlflowClient(tracking_uri)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("test").experiment_id], "tags.`medlit.cv.role` = 'parent'"
    )
    folds = pd.read_csv(client.download_artifacts(parent.info.run_id, "folds.csv"), dtype=str)
    held = folds[folds["fold"] != "test"]
    per_case = pd.read_csv(client.download_artifacts(parent.info.run_id, "cv_per_case.csv"))
    assert sorted(per_case["case_id"]) == sorted(held["case_id"])  # each image once
    pooled = summary.loc[("balanced_accuracy", "pooled")]
    assert pooled["n"] == len(held) and 0 <= pooled["mean"] <= 1
    assert "postprocessing.json" not in {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }  # nothing to postprocess in a classification
    ensemble = evaluate([*args, f"--cv_run={parent.info.run_id}", "--split=test"])
    assert 0 <= ensemble["test/balanced_accuracy"] <= 1
    images = sorted(root.rglob("*.jpg"))[:3]
    folder = tmp_path / "new"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    predict(
        [
            *args,
            f"--cv_run={parent.info.run_id}",
            f"--input={folder}",
            f"--output={tmp_path / 'out'}",
            "--uncertainty=variance",
        ]
    )
    spread = pd.read_csv(tmp_path / "out" / "uncertainty.csv")
    assert sorted(spread["image"]) == sorted(p.stem for p in images)
    assert (spread["variance"] > 0).all()  # three models of one epoch disagree
