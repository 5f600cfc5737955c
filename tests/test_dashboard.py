"""optuna-dashboard serves a real Optuna sweep's study: its trials read back over HTTP match the sweep."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.request import urlopen
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
import yaml
from conftest import cli_here, make_tree
from test_sweep import OPTUNA, job_dirs, read_summary, sweep_dirs

optuna_dashboard = pytest.importorskip("optuna_dashboard")


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):  # one line per request on stderr otherwise
        pass


def get_json(url: str):
    with urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow  # a two-trial sweep
def test_dashboard_serves_the_study_of_a_sweep(tmp_path: Path):
    tree = make_tree(tmp_path / "tiny")
    result = cli_here("imgcls.train", *OPTUNA, "hydra.sweeper.n_trials=2", f"data.root={tree}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    storage = f"sqlite:///{sweep / 'optuna.db'}"  # where hparams_search=optuna keeps the study
    study = optuna.load_study(study_name="imgcls", storage=storage)

    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(storage), handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        (listed,) = get_json(f"{base}/api/studies")["study_summaries"]
        assert listed["study_name"] == "imgcls" and listed["directions"] == ["maximize"]
        detail = get_json(f"{base}/api/studies/{listed['study_id']}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    served = detail["trials"]
    assert [t["number"] for t in served] == [0, 1] and [t["state"] for t in served] == ["Complete"] * 2
    rows = {int(r["job"]): r for r in read_summary(sweep)}  # the leaderboard, by job number
    for trial, job in zip(served, job_dirs(sweep), strict=True):
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert int(attrs["job_num"]) == int(job.name.split("_")[0])
        config = yaml.safe_load((job / "config.yaml").read_text())
        params = {p["name"]: p["param_external_value"] for p in trial["params"]}
        assert params == {
            "optimizer.lr": str(config["optimizer"]["lr"]),
            "data.batch_size": str(config["data"]["batch_size"]),
        }
        assert trial["values"] == [float(rows[int(attrs["job_num"])]["val/acc_best"])]
    best = max(rows.values(), key=lambda r: float(r["val/acc_best"]))
    assert detail["best_trials"][0]["values"] == [float(best["val/acc_best"])] == [study.best_trial.value]
