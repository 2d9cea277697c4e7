"""Top-k accuracy as an `evaluate` module, shipped with hf_dino so that it loads offline by path.

Predictions are ranked label lists (best first), e.g. the 5 highest-scoring classes of each
image, which is far lighter than passing every class score. For each k:
top_k = (1/N) * sum_i [reference_i in ranked_i[:k]]  (a fraction in [0, 1]).
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of references found among the first k ranked predictions, for several k."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): ranked predicted labels per example, best first,
        shape (N, R) with R >= max(k).
    references (list of int): true labels, shape (N,).
    k (list of int, default [1, 5]): the cut-offs.
Returns:
    top{k} (float) for each k: fraction in [0, 1].
Example:
    >>> metric = evaluate.load("path/to/hf_dino/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[0, 0], k=[1, 2])
    {'top1': 0.0, 'top2': 0.5}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, k=(1, 5)):
        if len(predictions) == 0:
            raise ValueError("top-k accuracy of an empty set is undefined")
        results = {}
        for cutoff in k:
            if any(len(ranked) < cutoff for ranked in predictions):
                raise ValueError(f"top-{cutoff} accuracy needs at least {cutoff} ranked predictions per example")
            hits = sum(int(reference in ranked[:cutoff]) for ranked, reference in zip(predictions, references))
            results[f"top{cutoff}"] = hits / len(predictions)
        return results
