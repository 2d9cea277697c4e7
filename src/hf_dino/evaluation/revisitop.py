"""Revisited Oxford / Paris (revisitop) ground truth and its scores.

Ground truth `gnd_NAME.pkl` (or `gnd_NAME.json`, the same structure) holds
`{"imlist": [name, ...], "qimlist": [name, ...], "gnd": [{"easy", "hard", "junk", "bbx"}, ...]}`:
one `gnd` entry per query, listing database indices. The pickle is read by a restricted
unpickler that builds only plain containers, strings, numbers and numpy arrays.

Scores follow revisitop's `compute_map`: a positive's rank is lowered by the number of junk
images ranked before it, average precision is the trapezoidal area under the precision-recall
curve, and mP@k divides by min(k, rank of the last positive). The three protocols:

- Easy:   positives = easy,        junk = junk + hard
- Medium: positives = easy + hard, junk = junk
- Hard:   positives = hard,        junk = junk + easy
"""

from __future__ import annotations

import codecs
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROTOCOLS = {"E": (("easy",), ("junk", "hard")),
             "M": (("easy", "hard"), ("junk",)),
             "H": (("hard",), ("junk", "easy"))}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A ground-truth pickle asked for something beyond containers, strings, numbers and arrays."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric

    allowed = {}
    for package in ("numpy.core", "numpy._core"):  # numpy 1.x pickles name numpy.core
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for builtins_name in ("builtins", "__builtin__"):
        allowed[(builtins_name, "set")] = set
        allowed[(builtins_name, "frozenset")] = frozenset
        allowed[(builtins_name, "bytearray")] = bytearray
        allowed[(builtins_name, "bytes")] = bytes
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array reconstruction functions, `set`, `frozenset`, `bytes`
    and `bytearray`; any other global (os.system, eval, a class, ...) raises `UnsafePickleError`
    before anything is called."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a ground-truth pickle may only hold lists, dicts, "
                "strings, numbers and numpy arrays") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in a ground-truth pickle")


def restricted_load(data: bytes) -> object:
    """Unpickle `data` admitting only plain containers, str, numbers and numpy arrays."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


@dataclass
class GroundTruth:
    """imlist: database names (N); qimlist: query names (Q); gnd: Q dicts of int index arrays."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, np.ndarray]]
    source: str = ""

    def protocol(self, name: str) -> list[dict[str, np.ndarray]]:
        """[{"ok", "junk"}] per query for protocol "E", "M" or "H"."""
        positive_keys, junk_keys = PROTOCOLS[name]
        return [{"ok": np.concatenate([entry[key] for key in positive_keys]),
                 "junk": np.concatenate([entry[key] for key in junk_keys])} for entry in self.gnd]


def _index_array(value, what: str, size: int) -> np.ndarray:
    array = np.asarray(value if value is not None else [], dtype=np.float64).reshape(-1)
    if array.size and (np.any(array != np.round(array)) or array.min() < 0 or array.max() >= size):
        raise ValueError(f"{what}: indices must be integers in [0, {size}) (the database list's length)")
    return array.astype(np.int64)


def parse_ground_truth(raw: object, source: str = "") -> GroundTruth:
    """Check and normalise the revisitop dict (as unpickled or read from JSON)."""
    if not isinstance(raw, Mapping) or not {"imlist", "qimlist", "gnd"} <= set(raw):
        raise ValueError(f"{source}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist = [str(name) for name in raw["imlist"]]
    qimlist = [str(name) for name in raw["qimlist"]]
    if len(raw["gnd"]) != len(qimlist):
        raise ValueError(f"{source}: {len(raw['gnd'])} 'gnd' entries for {len(qimlist)} queries")
    if not qimlist:
        raise ValueError(f"{source}: no query ('qimlist' is empty)")
    gnd = []
    for index, entry in enumerate(raw["gnd"]):
        if not isinstance(entry, Mapping) or not {"easy", "hard", "junk"} <= set(entry):
            raise ValueError(f"{source}: gnd[{index}] needs 'easy', 'hard' and 'junk' lists")
        gnd.append({key: _index_array(entry[key], f"{source}: gnd[{index}]['{key}']", len(imlist))
                    for key in ("easy", "hard", "junk")})
    return GroundTruth(imlist, qimlist, gnd, source)


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read `gnd_NAME.pkl` (restricted unpickler) or `gnd_NAME.json`."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".json":
        raw = json.loads(data)
    else:
        try:
            raw = restricted_load(data)
        except UnsafePickleError as error:
            raise UnsafePickleError(f"{path}: {error}") from None
        except Exception as error:
            raise ValueError(f"{path}: not a readable ground-truth pickle ({error})") from None
    return parse_ground_truth(raw, str(path))


def find_ground_truth(dataset_dir: str | Path, name: str) -> Path:
    """`DIR/gnd_NAME.pkl`, else `DIR/gnd_NAME.json`."""
    for suffix in (".pkl", ".json"):
        candidate = Path(dataset_dir) / f"gnd_{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{Path(dataset_dir) / f'gnd_{name}.pkl'}: no ground truth (nor gnd_{name}.json)")


def ground_truth_to_json(ground_truth: GroundTruth) -> dict:
    """The JSON form: lists of names and lists of int indices."""
    return {"imlist": ground_truth.imlist, "qimlist": ground_truth.qimlist,
            "gnd": [{key: value.tolist() for key, value in entry.items()} for entry in ground_truth.gnd]}


def average_precision(positive_ranks: np.ndarray, num_positives: int) -> float:
    """Trapezoidal AP from the sorted 0-based ranks of the retrieved positives (junk removed)."""
    ranks = np.asarray(positive_ranks, dtype=np.float64)
    found = np.arange(len(ranks), dtype=np.float64)
    precision_before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1))
    precision_after = (found + 1) / (ranks + 1)
    return float(np.sum(precision_before + precision_after) / (2.0 * num_positives))


def junk_adjusted_ranks(positive_positions: np.ndarray, junk_positions: np.ndarray) -> np.ndarray:
    """Sorted positions of the positives minus the number of junk images strictly before each."""
    positives = np.sort(np.asarray(positive_positions, dtype=np.int64))
    junk = np.sort(np.asarray(junk_positions, dtype=np.int64))
    return positives - np.searchsorted(junk, positives, side="left")


def score_query(positive_positions: np.ndarray, junk_positions: np.ndarray, num_positives: int,
                kappas: Sequence[int] = ()) -> tuple[float, np.ndarray]:
    """(AP, precision at each kappa) of one query from the ranking positions of its positives and
    junk images (0-based positions in the full ranking of the database)."""
    ranks = junk_adjusted_ranks(positive_positions, junk_positions)
    ap = average_precision(ranks, num_positives)
    one_based = ranks + 1
    precisions = np.zeros(len(kappas))
    if len(one_based):
        for j, kappa in enumerate(kappas):
            cutoff = min(int(one_based.max()), kappa)
            precisions[j] = (one_based <= cutoff).sum() / cutoff
    return ap, precisions


def map_from_positions(positions: Sequence[dict[str, np.ndarray]], protocol_gnd: Sequence[dict[str, np.ndarray]],
                       kappas: Sequence[int] = ()) -> dict:
    """Mean AP and mean precision@k over queries; queries without positives are left out (as
    revisitop does). `positions[q]["ok"|"junk"]` are the ranking positions of the items of
    `protocol_gnd[q]["ok"|"junk"]`. Returns {"mAP", "mP": (len(kappas),), "aps": (Q,), "num_scored"}."""
    aps = np.full(len(protocol_gnd), np.nan)
    precisions = np.full((len(protocol_gnd), len(kappas)), np.nan)
    for query, (entry, found) in enumerate(zip(protocol_gnd, positions)):
        if len(entry["ok"]) == 0:
            continue
        aps[query], precisions[query] = score_query(found["ok"], found["junk"], len(entry["ok"]), kappas)
    scored = ~np.isnan(aps)
    if not scored.any():
        raise ValueError("no query has a positive image: nothing to score")
    return {"mAP": float(aps[scored].mean()), "mP": precisions[scored].mean(axis=0), "aps": aps,
            "num_scored": int(scored.sum())}


def positions_in_ranking(ranks: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Positions (0-based) at which `items` appear in one query's ranking `ranks` (N,)."""
    return np.flatnonzero(np.isin(ranks, items))


def compute_map(ranks: np.ndarray, protocol_gnd: Sequence[dict[str, np.ndarray]],
                kappas: Sequence[int] = ()) -> dict:
    """revisitop's `compute_map` on a full ranking: ranks (N, Q), database indices best first."""
    positions = [{"ok": positions_in_ranking(ranks[:, query], entry["ok"]),
                  "junk": positions_in_ranking(ranks[:, query], entry.get("junk", np.empty(0)))}
                 for query, entry in enumerate(protocol_gnd)]
    return map_from_positions(positions, protocol_gnd, kappas)
