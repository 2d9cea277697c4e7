"""Accuracy as an `evaluate` module, shipped with hf_dino so that it loads offline by path.

accuracy = (1/N) * sum_i [prediction_i == reference_i]  (a fraction in [0, 1]).
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to the reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels, shape (N,).
    references (list of int): true labels, shape (N,).
Returns:
    accuracy (float): fraction in [0, 1] of correct predictions.
Example:
    >>> metric = evaluate.load("path/to/hf_dino/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("accuracy of an empty set is undefined")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(predictions)}
