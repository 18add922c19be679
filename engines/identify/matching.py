"""Matching a probe clip against a gallery with an ensemble: per-member search, voting, open-set decision.

Shared by the server and the offline evaluation, so the numbers a user sees from both agree.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class MatchDecision(enum.Enum):
    UNSPECIFIED = "unspecified"
    MATCH = "match"
    NO_MATCH = "no_match"
    UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class Candidate:
    person: str
    score: float  # mean over members of the best cosine similarity to the person's templates
    votes: int  # members whose top-1 is this person


@dataclass(frozen=True)
class MemberVote:
    member: str
    person: str | None
    score: float


def person_scores(probe: np.ndarray, templates: np.ndarray, owners: Sequence[str]) -> dict[str, float]:
    """Best cosine similarity per person (embeddings are L2-normalised, so a dot product)."""
    if templates.size == 0:
        return {}
    sims = templates @ probe
    best: dict[str, float] = {}
    for owner, s in zip(owners, sims.tolist(), strict=True):
        if s > best.get(owner, -2.0):
            best[owner] = s
    return best


def rank(member_scores: Sequence[dict[str, float]], members: Sequence[str]
         ) -> tuple[list[Candidate], list[MemberVote]]:
    """Candidates ordered by votes, then mean score; and each member's vote."""
    votes: list[MemberVote] = []
    tally: dict[str, int] = {}
    for name, scores in zip(members, member_scores, strict=True):
        if scores:
            top = max(scores, key=lambda p: scores[p])
            votes.append(MemberVote(name, top, scores[top]))
            tally[top] = tally.get(top, 0) + 1
        else:
            votes.append(MemberVote(name, None, 0.0))
    persons = set().union(*member_scores) if member_scores else set()
    n = len(member_scores)
    cands = [Candidate(p, sum(s.get(p, -1.0) for s in member_scores) / n, tally.get(p, 0)) for p in persons]
    cands.sort(key=lambda c: (-c.votes, -c.score, c.person))
    return cands, votes


def decide(top: Candidate | None, members: int, threshold: float, margin: float) -> MatchDecision:
    """MATCH needs the score at or above the threshold and a majority of votes; clearly below is NO_MATCH."""
    if top is None:
        return MatchDecision.NO_MATCH
    if top.score >= threshold and top.votes * 2 > members:
        return MatchDecision.MATCH
    if top.score < threshold - margin:
        return MatchDecision.NO_MATCH
    return MatchDecision.UNCERTAIN


def choose_threshold(genuine: Sequence[float], impostor: Sequence[float]) -> float:
    """The threshold that maximises TPR - FPR (Youden) between genuine and impostor top scores."""
    if not genuine or not impostor:
        return 0.5
    cands = sorted(set(genuine) | set(impostor))
    g, i = np.asarray(genuine), np.asarray(impostor)
    best_t, best_j = cands[0], -1.0
    for t in cands:
        j = float((g >= t).mean() - (i >= t).mean())
        if j > best_j:
            best_t, best_j = t, j
    return float(best_t)
