"""Evaluation: a model's predictions on a split, sample by sample, and what is reported from them.

Owns: per-sample inference through training's eval path (`inference`), metrics (top-k, calibration,
per-class scores: `metrics`), confusion matrices and classification reports (`reports`), the
per-image prediction rows and their CSV (`prediction_rows`: numpy only), a training run's final reports with its best weights (`final`), figures (`plots`),
console tables (`tables`), ensembles of runs (`ensemble`), labelling a split by a checkpoint's
class names (`labels`), and the commands over a finished run behind their entries (imgcls.evaluate,
imgcls.predict): `evaluate_command`, `predict_command` (a run's checkpoint) and `predictions`
(predict's inputs and predictions.csv, and the ONNX predictor: no torch).

May import: `imgcls.errors`, `imgcls.log`, `imgcls.checkpoint`, `imgcls.data`, `imgcls.training`
(the eval step and device placement), `imgcls.runs`, `imgcls.deploy.exported` (the ONNX predictor),
`imgcls.pages` (the evaluation's page).
"""
