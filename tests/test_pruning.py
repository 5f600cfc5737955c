"""Pruning across jobs (issue 25, item 7): a sweep job reports each epoch to its trial through the
study's storage and stops when the study's pruner says so; the run says `pruned` and resumes by hand."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import optuna
import pytest
from conftest import TINY, cli, cli_here, make_tree

from imgcls.errors import ConfigError
from imgcls.sweeps.pruning import STUDY_ENV, TRIAL_ENV, build_pruner, trial_link
from imgcls.sweeps.summary import read_job, summarize

REPO = Path(__file__).resolve().parents[1]
EPOCHS4 = [o for o in TINY if not o.startswith("trainer.epochs=")] + ["trainer.epochs=4"]
MEDIAN = "{_target_: optuna.pruners.MedianPruner, n_startup_trials: 1, n_warmup_steps: 1}"


def test_build_pruner_builds_optunas_pruners_and_refuses_other_targets():
    assert build_pruner(None) is None
    median = build_pruner({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1})
    assert isinstance(median, optuna.pruners.MedianPruner)
    asha = build_pruner({"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1})
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner)
    hyperband = build_pruner({"_target_": "optuna.pruners.HyperbandPruner", "max_resource": 4})
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.pruner\._target_=os\.system: not a pruner"):
        build_pruner({"_target_": "os.system", "command": "true"})


def test_a_job_is_linked_to_its_trial_only_by_the_sweepers_environment():
    sweeper = {"storage": "sqlite:///x.db", "study_name": "s", "pruner": None}
    assert trial_link({}, sweeper) is None  # a plain run, or a grid sweep's job
    link = trial_link({TRIAL_ENV: "7", STUDY_ENV: "lr"}, sweeper)
    assert (link.storage, link.study, link.trial_id) == ("sqlite:///x.db", "lr", 7)
    # a study in memory cannot be reached from a job: it trains unpruned (a warning says why)
    assert trial_link({TRIAL_ENV: "7"}, {**sweeper, "storage": None}) is None


def _study_with_a_good_trial(db: Path) -> tuple[optuna.Study, optuna.Trial]:
    """A study whose first trial scored 1.0 at every epoch, and a second trial asked for the job."""
    study = optuna.create_study(study_name="prune", storage=f"sqlite:///{db}", direction="maximize")
    good = study.ask()
    for epoch in range(1, 5):
        good.report(1.0, epoch)
    study.tell(good, 1.0)
    return study, study.ask()


@pytest.mark.slow
def test_a_pruned_job_stops_saves_last_pt_says_pruned_and_resumes(tmp_path: Path, monkeypatch):
    tree = make_tree(tmp_path / "tiny")
    study, trial = _study_with_a_good_trial(tmp_path / "optuna.db")
    job = tmp_path / "sweep" / "0_lr-1e-06"  # a job folder, as the sweeper's launcher names it
    # what the sweeper sets per job (hydra.job.env_set), and the scheduler's ids of the process
    monkeypatch.setenv(TRIAL_ENV, str(trial._trial_id))
    monkeypatch.setenv(STUDY_ENV, "prune")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    result = cli(
        "imgcls.train", *EPOCHS4, f"data.root={tree}", "optimizer.lr=1e-06", f"hydra.run.dir={job}",
        f"++hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", f"++hydra.sweeper.pruner={MEDIAN}",
        cwd=tmp_path,
    )  # fmt: skip
    # the job raises optuna.TrialPruned: what Optuna's objectives raise, handed to the sweeper
    assert "optuna.exceptions.TrialPruned: pruned at epoch 1 of 4" in result.stderr, result.stderr[-3000:]
    record = json.loads((job / "run.json").read_text())
    assert record["status"] == "pruned" and record["epochs_done"] == 1 < 4
    assert record["notes"][0].startswith("pruned at epoch 1 of 4 by the study's MedianPruner")
    assert f"resume={job / 'weights' / 'last.pt'}" in record["notes"][0]
    assert (record["slurm_job_id"], record["slurm_array_job_id"], record["slurm_array_task_id"]) == (
        "4242", "4240", "2",
    )  # fmt: skip
    summary = (job / "summary.txt").read_text()
    assert "status:         pruned\n" in summary and "epoch:          1 of 4\n" in summary
    assert "note:           pruned at epoch 1 of 4" in summary
    assert "slurm job:      4242 (array 4240_2)\n" in summary
    assert (job / "weights" / "last.pt").is_file()
    assert not (job / "logs" / "classification_report_val.json").exists()  # no final reports
    # the study holds the job's reports: the record's best so far, per epoch
    reported = study.trials[1].intermediate_values
    assert reported == {1: pytest.approx(record["best"]["score"])}
    # the leaderboard and the sweep page say pruned, with the reason
    (job / ".hydra").mkdir(exist_ok=True)  # hydra.run.dir wrote it; a job folder is one with .hydra
    assert read_job(job)["status"] == "pruned" and read_job(job)["epochs"] == "1/4"
    summarize(job.parent, stream=open("/dev/null", "w"))
    page = (job.parent / "report.html").read_text()
    assert '<span class="status pruned">pruned</span>' in page and "pruned at epoch 1 of 4" in page
    assert "1 jobs, 0 completed, 1 pruned" in page

    # resumed by hand (no sweep: no trial to report to), it trains on to its epochs in its folder
    for name in (TRIAL_ENV, STUDY_ENV, "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name)
    resumed = cli_here("imgcls.train", f"resume={job / 'weights' / 'last.pt'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((job / "run.json").read_text())
    assert record["status"] == "completed" and record["epochs_done"] == 4
    assert record["slurm_job_id"] is None
    assert read_job(job)["status"] == "completed" and read_job(job)["epochs"] == "4/4"


def _sweeper_prunes() -> bool:
    return "pruner" in (REPO / "conf" / "hydra" / "sweeper" / "imgcls_optuna.yaml").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not _sweeper_prunes(), reason="the sweeper side does not pass hydra.sweeper.pruner yet")
def test_an_optuna_sweep_with_a_median_pruner_prunes_a_hopeless_trial(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    args = [
        "-m", "hparams_search=optuna", *EPOCHS4, f"data.root={tree}", "hydra.sweeper.n_trials=4",
        # hopeless: 1e-7 learns nothing in 4 epochs; the first trial (0.05) sets the median
        "optimizer.lr=choice(0.05, 1e-7)", f"hydra.sweeper.pruner={MEDIAN}",
    ]  # fmt: skip
    result = cli("imgcls.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = [p.parent for p in tmp_path.glob("multirun/*/*/optuna.db")]
    trials = optuna.load_study(study_name="imgcls", storage=f"sqlite:///{sweep / 'optuna.db'}").trials
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [(t.params, t.state.name, t.intermediate_values) for t in trials]
    rows = {row["job"]: row for row in (read_job(j) for j in sweep.glob("*_*") if (j / ".hydra").is_dir())}
    for t in pruned:
        row = rows[t.user_attrs["job_num"]]
        assert row["status"] == "pruned" and int(row["epochs"].split("/")[0]) < 4
        assert (Path(row["run_dir"]) / "weights" / "last.pt").is_file()


@pytest.mark.slow
def test_a_sweep_job_resumed_with_m_continues_in_its_own_folder_with_its_overrides(tmp_path: Path):
    """Issue 25, item 4: `-m ... resume=<sweep>/<job>/weights/last.pt` keeps the job's identity."""
    tree = make_tree(tmp_path / "tiny")
    args = ["-m", *TINY, f"data.root={tree}", "optimizer.lr=0.02"]
    cut = cli_here("imgcls.train", *args, cwd=tmp_path, signal_at=("first training step", signal.SIGTERM))
    assert cut.returncode != 0
    (sweep,) = (p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir())
    (job,) = (p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert read_job(job)["status"] == "interrupted"
    overrides = (job / ".hydra" / "overrides.yaml").read_text()
    sweep_config = (sweep / "multirun.yaml").read_text()

    resumed = cli_here("imgcls.train", "-m", f"resume={job / 'weights' / 'last.pt'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # no new job folder, and no new sweep folder: the job's own folder holds the resumed run
    assert [p for p in sweep.iterdir() if (p / ".hydra").is_dir()] == [job]
    assert [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()] == [sweep]
    record = json.loads((job / "run.json").read_text())
    assert record["status"] == "completed" and record["epochs_done"] == 2 and record["resumed"]
    assert (job / ".hydra" / "overrides.yaml").read_text() == overrides  # its overrides, as they were
    assert (sweep / "multirun.yaml").read_text() == sweep_config  # and the sweep's config
    assert "lr: 0.02" in (job / "config.yaml").read_text()
    # the leaderboard, rebuilt over the sweep, shows the resumed result in the job's row
    (row,) = csv.DictReader(open(sweep / "sweep_summary.csv"))
    assert (row["job"], row["status"], row["epochs"]) == ("0", "completed", "2/2")
    assert float(row["val/acc_best"]) == record["best"]["score"]
