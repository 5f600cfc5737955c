"""The pieces of evaluation on their own: command-line split, overrides (Hydra's compose), metrics, top-k."""

from __future__ import annotations

import numpy as np
import pytest

from imgcls.cli import CONFIG_DIR, split_argv
from imgcls.errors import ConfigError
from imgcls.evaluation.inference import topk_indices
from imgcls.evaluation.metrics import (
    calibration_bins,
    confused_pairs,
    expected_calibration_error,
    topk_accuracy,
)
from imgcls.runs import apply_overrides, output_dir

OWN = {"run_dir", "checkpoint", "split", "top_k", "calibration_bins", "errors_shown", "out_dir"}
RUN = "outputs/2026-11-27/10-31-07_batch_size=32,lr=0.01"


def test_split_argv_sends_run_keys_to_the_saved_config():
    argv = [f"run_dir={RUN}", "split=val", "data.root=/t", "+data.extra=1", "~loss.label_smoothing",
            "--cfg", "job", "-cn", "evaluate", "hydra.verbose=true", "device=cpu", "transforms.val=[]"]  # fmt: skip
    hydra_args, overrides = split_argv(argv, OWN, ("run_dir",))
    # the run directory's `=` and `,` are quoted for Hydra's grammar
    assert hydra_args == [
        f"run_dir='{RUN}'",
        "split=val",
        "--cfg",
        "job",
        "-cn",
        "evaluate",
        "hydra.verbose=true",
    ]
    assert overrides == [
        "data.root=/t",
        "+data.extra=1",
        "~loss.label_smoothing",
        "device=cpu",
        "transforms.val=[]",
    ]
    # already quoted: left as it is
    assert split_argv([f"run_dir='{RUN}'"], OWN, ("run_dir",))[0] == [f"run_dir='{RUN}'"]


CONFIG = {
    "data": {"root": "a", "batch_size": 4, "splits": {"val": "val"}},
    "loss": {"label_smoothing": 0.1},
    "device": "auto",
}


def test_apply_overrides_sets_adds_and_deletes():
    out = apply_overrides(
        CONFIG,
        [
            "data.root=/b",
            "device=cpu",
            "+data.splits.holdout=ho",
            "~loss.label_smoothing",
            "data={batch_size:8}",
        ],
        "c.yaml",
    )
    assert out["data"] == {"root": "/b", "batch_size": 8, "splits": {"val": "val", "holdout": "ho"}}
    assert out["loss"] == {} and out["device"] == "cpu"
    assert CONFIG["data"]["root"] == "a"  # the saved config itself is untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.rooot=x",
            "data.rooot is not in the run's config (c.yaml); data has: root, batch_size, splits",
        ),
        ("data=imagefolder", "data is a config node of the run, not a value"),
        ("+data.root=x", "data.root is already in the run's config; drop the +"),
        ("~data.nope", "data.nope is not in the run's config"),
        ("device=cpu,cuda", "one value per key"),
        ("data.root=[", "cannot parse the overrides"),
    ],
)
def test_apply_overrides_refuses_what_it_cannot_apply(override, message):
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
    ):
        apply_overrides(CONFIG, [override], "c.yaml")


def test_overrides_use_hydras_grammar():
    out = apply_overrides(
        CONFIG,
        ["data.root='x=1,y'", "+data.tags=[a,b]", "data.batch_size=int(8.0)", "device=${data.root}"],
        "c.yaml",
    )
    assert out["data"]["root"] == "x=1,y" and out["data"]["tags"] == ["a", "b"]
    assert out["data"]["batch_size"] == 8 and out["device"] == "x=1,y"


def test_overrides_compose_inside_an_entrys_hydra_and_give_it_back():
    """evaluate, predict and export apply them from inside their own Hydra job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONFIG_DIR):
        entry = GlobalHydra.instance().hydra
        assert apply_overrides(CONFIG, ["device=cpu"], "c.yaml")["device"] == "cpu"
        assert GlobalHydra.instance().hydra is entry
        assert compose(config_name="evaluate")["checkpoint"] == "best"
    assert not GlobalHydra.instance().is_initialized()


def test_output_dir_never_reuses_a_folder(tmp_path):
    first = output_dir(tmp_path, "test-best", [])
    second = output_dir(tmp_path, "test-best", [])
    named = output_dir(
        tmp_path, "test-best", ["data.root=/data/other_tree", "device=cpu", "data.num_workers=0"]
    )
    assert [first.name, second.name, named.name] == ["test-best", "test-best_2", "test-best_root-other_tree"]


def test_calibration_bins_and_ece_by_hand():
    conf = np.array([0.05, 0.55, 0.6, 0.95, 1.0, 0.5])
    correct = np.array([0, 1, 0, 1, 1, 1])
    bins = calibration_bins(conf, correct, n_bins=2)  # (0, 0.5] and (0.5, 1]
    assert bins["count"].tolist() == [2, 4]
    assert bins["accuracy"].tolist() == [0.5, 0.75]
    assert bins["confidence"] == pytest.approx([0.275, 0.775])
    # 2/6 * |0.5 - 0.275| + 4/6 * |0.75 - 0.775|
    assert expected_calibration_error(bins) == pytest.approx(2 / 6 * 0.225 + 4 / 6 * 0.025)
    perfect = calibration_bins(np.array([1.0, 1.0]), np.array([1, 1]), 15)
    assert expected_calibration_error(perfect) == 0.0


def test_topk_breaks_ties_like_argmax():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    assert topk_indices(logits, 3).tolist() == [[1, 2, 0], [0, 1, 2]]
    assert topk_indices(logits, 1)[:, 0].tolist() == logits.argmax(1).tolist()
    assert topk_accuracy(logits, np.array([0, 3]), 3) == 0.5


def test_confused_pairs_largest_first_with_the_true_class_share():
    cm = np.array([[5, 3, 0], [1, 4, 0], [0, 6, 0]])
    pairs = confused_pairs(cm, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("c", "b", 6),
        ("a", "b", 3),
        ("b", "a", 1),
    ]
    assert pairs[1]["share"] == pytest.approx(3 / 8)


def test_force_add_sets_a_key_whether_or_not_it_exists():
    out = apply_overrides(CONFIG, ["++data.root=c", "++data.extra=1"], "c.yaml")
    assert out["data"]["root"] == "c" and out["data"]["extra"] == 1


def test_predictions_table_lists_the_first_rows_or_all():
    from imgcls.evaluation.tables import predictions_table

    rows = [{"path": f"{i}.jpg", "top1": "cat", "top1_prob": "0.9"} for i in range(5)]
    assert predictions_table(rows, 1, 2).row_count == 2
    assert "first 2 of 5" in predictions_table(rows, 1, 2).title
    assert predictions_table(rows, 1, -1).row_count == 5


@pytest.mark.parametrize("seed", range(6))
def test_reports_and_scores_are_scikit_learns(seed):
    """The report files hold scikit-learn's numbers: the same text, byte for byte, and the same
    scores in the JSON form, with classes never predicted, classes absent from the targets and long
    names."""
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    from imgcls.evaluation.scores import confusion, report_dict, report_text

    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 9))
    names = [f"class_{i}" + "x" * int(rng.integers(0, 20)) for i in range(n_classes)]
    targets = rng.integers(0, n_classes - (seed % 2), size=int(rng.integers(1, 200)))  # odd seeds: one absent
    preds = np.where(
        rng.random(len(targets)) < 0.6, targets, rng.integers(0, max(1, n_classes - 1), len(targets))
    )
    labels = list(range(n_classes))

    assert report_text(targets, preds, names) == classification_report(
        targets, preds, labels=labels, target_names=names, digits=4, zero_division=0
    )
    assert (confusion(targets, preds, n_classes) == confusion_matrix(targets, preds, labels=labels)).all()
    ours = report_dict(targets, preds, names)
    p, r, f, s = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        assert ours["classes"][name] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}, abs=1e-12
        )
    assert ours["accuracy"] == pytest.approx(float(np.mean(targets == preds)), abs=1e-12)
    for average in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            targets, preds, labels=labels, average=average, zero_division=0
        )
        assert ours[f"{average} avg"] == pytest.approx(
            {"precision": ap, "recall": ar, "f1": af, "support": len(targets)}, abs=1e-12
        )


def test_reports_refuse_a_class_index_outside_the_names():
    from imgcls.evaluation.scores import confusion

    with pytest.raises(ValueError, match="outside 0..2"):
        confusion([0, 1, 3], [0, 1, 2], 3)
