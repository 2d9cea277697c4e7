"""revisitop ground truth and scores: hand-worked rankings, numbers computed by revisitop's own
`compute_map` (stored below), the restricted unpickler against malicious pickles."""

import json
import os
import pickle

import numpy as np
import pytest

from hf_dino.evaluation.revisitop import (GroundTruth, UnsafePickleError, average_precision, compute_map,
                                          ground_truth_to_json, load_ground_truth, parse_ground_truth,
                                          restricted_load)

# One database of 10 images, two queries, worked by hand (positions are 0-based):
# query 0 ranks [3, 7, 1, 0, 5, 2, 9, 4, 6, 8]; easy {3, 5}, hard {0, 9}, junk {7}
#   Medium: positives at 0, 3, 4, 6; junk 7 at 1 -> ranks 0, 2, 3, 5
#     AP = [(1+1) + (1/2+2/3) + (2/3+3/4) + (3/5+4/6)] / 2 / 4 = 0.73125
#     P@1 = 1, P@5 = 3/5, P@10 = 4/min(6, 10)
#   Hard: positives 0, 9 at 3, 6; junk 7, 3, 5 at 1, 0, 4 -> ranks 1, 3
#     AP = [(0 + 1/2) + (1/3 + 2/4)] / 2 / 2 = 1/3; P@1 = 0, P@5 = 2/min(4, 5), P@10 = 2/4
#   Easy: positives 3, 5 at 0, 4; junk 7, 0, 9 at 1, 3, 6 -> ranks 0, 2
#     AP = [(1+1) + (1/2+2/3)] / 2 / 2 = 0.791667
# query 1 ranks [2, 8, 0, ...]; easy {8}, no hard, junk {2}: the junk at 0 lifts 8 to rank 0 (AP 1);
#   without hard positives it is left out of the Hard mean.
HAND_RANKS = np.array([[3, 7, 1, 0, 5, 2, 9, 4, 6, 8], [2, 8, 0, 1, 3, 4, 5, 6, 7, 9]]).T
HAND_GND = {"imlist": [f"db{i}" for i in range(10)], "qimlist": ["q0", "q1"],
            "gnd": [{"easy": [3, 5], "hard": [0, 9], "junk": [7], "bbx": [1.0, 2.0, 3.0, 4.0]},
                    {"easy": [8], "hard": [], "junk": [2]}]}
HAND_EXPECTED = {"E": (0.8958333, [1.0, 5 / 6, 5 / 6]),
                 "M": ((0.73125 + 1) / 2, [1.0, (0.6 + 1) / 2, (4 / 6 + 1) / 2]),
                 "H": (1 / 3, [0.0, 0.5, 0.5])}

# Random rankings and ground truths with the scores revisitop's compute_map gave for them (run once
# with /work/ref/revisitop/python/evaluate.py; "ranks" is queries x database here).
REVISITOP_CASES = [
    {"ranks": [[11, 1, 2, 9, 8, 6, 13, 0, 12, 3, 5, 14, 7, 4, 10], [5, 12, 10, 9, 3, 7, 8, 0, 4, 11, 14, 1, 6, 13, 2], [3, 13, 10, 8, 9, 0, 1, 12, 5, 7, 6, 11, 2, 14, 4], [10, 14, 0, 7, 3, 4, 1, 6, 12, 9, 5, 2, 8, 13, 11]],
     "gnd": [{"easy": [2], "hard": [], "junk": [14]}, {"easy": [3], "hard": [9], "junk": [7]}, {"easy": [7], "hard": [], "junk": []}, {"easy": [12, 6], "hard": [14, 10, 1], "junk": [0, 2, 5]}],
     "expected": {"E": [0.14166666666666666, [0.0, 0.24583333333333332, 0.2708333333333333]], "M": [0.28961309523809525, [0.25, 0.2833333333333333, 0.36458333333333337]], "H": [0.4708333333333333, [0.5, 0.325, 0.375]]}},
    {"ranks": [[1, 9, 7, 12, 6, 8, 4, 2, 10, 0, 3, 13, 11, 14, 5], [10, 5, 7, 2, 12, 8, 4, 13, 3, 1, 6, 14, 0, 9, 11], [8, 0, 5, 4, 3, 7, 13, 9, 12, 14, 11, 10, 6, 2, 1], [5, 13, 7, 6, 12, 3, 0, 1, 2, 4, 9, 14, 8, 11, 10]],
     "gnd": [{"easy": [13, 4, 7], "hard": [2, 11], "junk": [3]}, {"easy": [2, 12, 6], "hard": [], "junk": []}, {"easy": [9], "hard": [8], "junk": [14, 7, 0]}, {"easy": [8, 6], "hard": [], "junk": []}],
     "expected": {"E": [0.16714304214304213, [0.0, 0.25, 0.19999999999999998]], "M": [0.3182382201132201, [0.25, 0.25, 0.2333333333333333]], "H": [0.5642361111111112, [0.5, 0.5, 0.6111111111111112]]}},
    {"ranks": [[0, 3, 7, 12, 4, 10, 2, 13, 1, 11, 8, 9, 6, 5, 14], [4, 1, 14, 5, 8, 6, 0, 11, 10, 9, 13, 7, 3, 2, 12], [12, 7, 4, 14, 5, 0, 2, 1, 10, 8, 11, 6, 9, 13, 3], [6, 13, 11, 3, 14, 0, 1, 9, 5, 10, 7, 8, 4, 2, 12]],
     "gnd": [{"easy": [], "hard": [5, 3, 7], "junk": [8]}, {"easy": [], "hard": [8], "junk": []}, {"easy": [6], "hard": [2], "junk": [3]}, {"easy": [], "hard": [13, 6], "junk": [10]}],
     "expected": {"E": [0.045454545454545456, [0.0, 0.0, 0.0]], "M": [0.3860313297813298, [0.25, 0.4, 0.375]], "H": [0.37886141636141635, [0.25, 0.4, 0.38571428571428573]]}},
]


def ground_truth(raw: dict) -> GroundTruth:
    return parse_ground_truth(raw, "test")


@pytest.mark.parametrize("protocol", ["E", "M", "H"])
def test_hand_worked_ranking(protocol):
    scores = compute_map(HAND_RANKS, ground_truth(HAND_GND).protocol(protocol), kappas=(1, 5, 10))
    expected_map, expected_precision = HAND_EXPECTED[protocol]
    assert scores["mAP"] == pytest.approx(expected_map, abs=1e-6)
    np.testing.assert_allclose(scores["mP"], expected_precision, atol=1e-6)


def test_hard_protocol_leaves_out_queries_without_hard_positives():
    scores = compute_map(HAND_RANKS, ground_truth(HAND_GND).protocol("H"))
    assert scores["num_scored"] == 1 and np.isnan(scores["aps"][1])


def test_easy_medium_hard_differ_only_in_what_counts():
    # a ranking that puts the hard positive first and the easy one last
    gnd = ground_truth({"imlist": list("abcd"), "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [0], "junk": []}]})
    ranks = np.array([[0, 1, 2, 3]]).T
    assert compute_map(ranks, gnd.protocol("H"))["mAP"] == pytest.approx(1.0)  # easy 3 is junk
    assert compute_map(ranks, gnd.protocol("E"))["mAP"] == pytest.approx((0 + 1 / 3) / 2)  # hard 0 is junk: 3 at rank 2
    assert compute_map(ranks, gnd.protocol("M"))["mAP"] == pytest.approx((2 + (1 / 3 + 2 / 4)) / 4)


@pytest.mark.parametrize("case", REVISITOP_CASES)
def test_matches_revisitop_compute_map(case):
    gnd = ground_truth({"imlist": [str(i) for i in range(15)], "qimlist": [str(i) for i in range(4)],
                        "gnd": case["gnd"]})
    ranks = np.array(case["ranks"]).T
    for protocol, (expected_map, expected_precision) in case["expected"].items():
        scores = compute_map(ranks, gnd.protocol(protocol), kappas=(1, 5, 10))
        assert scores["mAP"] == pytest.approx(expected_map, abs=1e-12)
        np.testing.assert_allclose(scores["mP"], expected_precision, atol=1e-12)


def test_average_precision_formula():
    # positives at ranks 1 and 4 of 3: [(0 + 1/2) + (1/4 + 2/5)] / 2 / 3
    assert average_precision(np.array([1, 4]), 3) == pytest.approx((0.5 + 0.25 + 0.4) / 6)


@pytest.mark.parametrize("protocol_version", [2, 4, 5])
def test_restricted_unpickler_reads_revisitop_pickles(tmp_path, protocol_version):
    raw = {"imlist": ["all_souls_000013", "radcliffe_000001"], "qimlist": ["all_souls_000013"],
           "gnd": [{"easy": np.array([1], dtype=np.int64), "hard": np.array([], dtype=np.int64),
                    "junk": [0], "bbx": np.array([136.5, 34.1, 648.5, 955.6])}]}
    path = tmp_path / "gnd_mini.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=protocol_version))
    loaded = load_ground_truth(path)
    assert loaded.imlist == raw["imlist"] and loaded.qimlist == raw["qimlist"]
    assert loaded.gnd[0]["easy"].tolist() == [1] and loaded.gnd[0]["junk"].tolist() == [0]
    # numpy scalars and sets are plain data too
    assert restricted_load(pickle.dumps({"x": np.float64(2.5), "s": {1, 2}}, protocol=2)) == {"x": 2.5, "s": {1, 2}}


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Evaluates:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("protocol_version", [0, 2, 5])
def test_restricted_unpickler_refuses_code(tmp_path, protocol_version):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"imlist": [], "qimlist": [], "gnd": [RunsShell(marker)]}, protocol=protocol_version)
    assert pickle.loads(payload) is not None and marker.exists()  # the payload really runs under pickle
    marker.unlink()
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="gnd_evil.pkl.*(posix|nt).system"):
        load_ground_truth(path)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"(builtins|__builtin__)\.eval"):
        restricted_load(pickle.dumps(Evaluates(), protocol=protocol_version))
    with pytest.raises(UnsafePickleError):  # a class is not plain data either
        restricted_load(pickle.dumps(GroundTruth, protocol=protocol_version))


def test_json_form_round_trip(tmp_path):
    path = tmp_path / "gnd_mini.json"
    path.write_text(json.dumps(ground_truth_to_json(ground_truth(HAND_GND))))
    loaded = load_ground_truth(path)
    scores = compute_map(HAND_RANKS, loaded.protocol("M"), kappas=(1, 5, 10))
    assert scores["mAP"] == pytest.approx(HAND_EXPECTED["M"][0])


@pytest.mark.parametrize("gnd, message", [
    ([{"easy": [12], "hard": [], "junk": []}], r"gnd\[0\]\['easy'\].*\[0, 10\)"),
    ([{"easy": [1], "junk": []}], "needs 'easy', 'hard' and 'junk'"),
    ([], "0 'gnd' entries for 1 queries"),
])
def test_malformed_ground_truth(gnd, message):
    with pytest.raises(ValueError, match=message):
        parse_ground_truth({"imlist": [str(i) for i in range(10)], "qimlist": ["q"], "gnd": gnd}, "gnd_x.pkl")
