"""Gallery search, ensemble voting, open-set decisions and the threshold choice."""

import numpy as np

from engines.identify.matching import MatchDecision, choose_threshold, decide, person_scores, rank


def unit(*v: float) -> np.ndarray:
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


def test_best_template_per_person() -> None:
    templates = np.stack([unit(1, 0), unit(0.6, 0.8), unit(0, 1)])
    scores = person_scores(unit(1, 0), templates, ["a", "a", "b"])
    assert scores["a"] == 1.0 and abs(scores["b"]) < 1e-6
    assert person_scores(unit(1, 0), np.zeros((0, 2), np.float32), []) == {}


def test_votes_outrank_mean_score() -> None:
    cands, votes = rank([{"a": 0.9, "b": 0.8}, {"a": 0.5, "b": 0.6}, {"a": 0.4, "b": 0.7}], ["m0", "m1", "m2"])
    assert [c.person for c in cands] == ["b", "a"]
    assert cands[0].votes == 2 and [v.person for v in votes] == ["a", "b", "b"]


def test_decisions() -> None:
    cands, _ = rank([{"a": 0.9}, {"a": 0.8}], ["m0", "m1"])
    assert decide(cands[0], 2, 0.7, 0.1) == MatchDecision.MATCH
    assert decide(cands[0], 2, 0.95, 0.05) == MatchDecision.NO_MATCH
    assert decide(cands[0], 2, 0.9, 0.1) == MatchDecision.UNCERTAIN
    split, _ = rank([{"a": 0.9, "b": 0.1}, {"b": 0.9, "a": 0.1}], ["m0", "m1"])
    assert decide(split[0], 2, 0.3, 0.1) == MatchDecision.UNCERTAIN  # no majority
    assert decide(None, 2, 0.5, 0.1) == MatchDecision.NO_MATCH


def test_threshold_separates_genuine_from_impostor() -> None:
    t = choose_threshold([0.8, 0.85, 0.9, 0.7], [0.3, 0.4, 0.5, 0.72])
    assert 0.5 < t <= 0.8
