"""Agency: goals that steer decoding and measure their own progress, and attention foci.

A goal is encoded with the model itself: ``g = mean_t h_t(goal text) - h_ref`` (final hidden
states, centred by the model's mean hidden state on a neutral calibration text). During a
generation with running mean hidden state ``m`` (centred the same way) and text ``y``:

    progress = 1/2 * max(0, cos(m, g)) + 1/2 * coverage(y),
    coverage(y) = share of the goal's content words present in y as whole words (plurals count)

(``progress = max(0, cos(m, g))`` for a goal without content words, which has nothing to cover)
and the goal is achieved once ``progress >= achievement_threshold``. Active goals steer
decoding with a logit bias on goal-word tokens: the next token of a goal word whose prefix the
output just produced gets ``beta * (1 + k / len)``; at a word boundary the first token of
each goal word gets ``beta / 2``; ``beta = goal_bias * priority * (1 + stall / 2)`` grows
while progress stalls (``stall`` = updates without a gain, capped at 4). Words already present
in the output are no longer pushed.

Attention foci are the context words with the highest salience

    salience = novelty_w * novelty + relevance_w * relevance + intensity_w * intensity

novelty = mean surprisal of the word's tokens / ln V (clipped to [0, 1]); relevance = the best
centred cosine of the word's hidden states with an active goal (1 for a goal word);
intensity = last-layer attention mass of the latest query on the word, over the largest word's.
Foci are typed ``concept`` (a word holding a bound PRSC concept's tokens), ``goal`` (a goal word) or ``token``;
duration counts the generated tokens since the focus was first held without interruption.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import regex
import torch

STOPWORDS = frozenset(
    "a an and are as at be but by for from has have in into is it its of on or that the this to was were "
    "will with about what which when where who how than then them they their there these those your you "
    "very just more most some such only also each both make made provide give".split()
)
ACTIVE, ACHIEVED, ABANDONED = "active", "achieved", "abandoned"
GOAL_TYPES = ("exploratory", "informative", "creative", "task")


_WORD_CHAR = r"[\p{L}\p{M}]"  # letters and the marks that join them (Devanagari, Thai vowel signs, accents)


def _nfc(text: str) -> str:
    """One spelling per word: "décision" typed with a combining accent is the composed one."""
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def content_words(text: str) -> list[str]:
    """Lower-cased words of at least 4 characters (letters of any script and their marks) that
    are not stopwords, in order, unique. Scripts written without spaces between words (Chinese,
    Japanese, Thai) give a whole run of text as one word, which a response rarely repeats."""
    out: list[str] = []
    for w in regex.findall(rf"\p{{L}}(?:{_WORD_CHAR}|['-]){{3,}}", _nfc(text.lower())):
        w = w.strip("'-")
        if len(w) >= 4 and w not in STOPWORDS and w not in out:
            out.append(w)
    return out


@functools.lru_cache(maxsize=4096)
def _word_pattern(word: str) -> regex.Pattern[str]:
    """``word`` as a whole word of lower-cased text, plural endings allowed ("goal" matches
    "goals", not "goalkeeper"; "rain" does not match "training"; "cision" not "décision")."""
    return regex.compile(rf"(?<!{_WORD_CHAR}){regex.escape(word)}(?:s|es)?(?!{_WORD_CHAR})")


def words_present(words: list[str], low: str) -> list[bool]:
    """For each (lower-case) word, whether it occurs as a whole word in the lower-cased ``low``."""
    low = _nfc(low)
    return [_word_pattern(w).search(low) is not None for w in words]


def word_coverage(words: list[str], text: str) -> float:
    """Share of ``words`` occurring in ``text`` as whole words (see ``_word_pattern``)."""
    if not words:
        return 0.0
    return sum(words_present(words, text.lower())) / len(words)


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(float(np.dot(a, a))), math.sqrt(float(np.dot(b, b)))  # what np.linalg.norm computes
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b)) / (na * nb)


@dataclass
class Goal:
    id: int
    description: str
    goal_type: str
    priority: float
    vector: list[float]  # centred mean hidden state of the description (D,)
    words: list[str]  # content words
    word_tokens: list[list[int]]  # token sequences of the content words (steering)
    boundary: list[bool]  # whether the sequence may only start at a word boundary
    word_of: list[int] = field(default_factory=list)  # index into ``words`` of each token sequence
    covered: list[bool] = field(default_factory=list)  # content words already in the output (of the
    # latest generation; cleared when the next one starts, so a new output is steered to every word)
    status: str = ACTIVE
    progress: float = 0.0
    stall: int = 0
    achieved_at: int | None = None  # global token step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Goal":
        return cls(int(d["id"]), str(d["description"]), str(d["goal_type"]), float(d["priority"]),
                   [float(v) for v in d["vector"]], [str(w) for w in d["words"]],
                   [[int(t) for t in s] for s in d["word_tokens"]], [bool(b) for b in d["boundary"]],
                   [int(i) for i in d["word_of"]], [bool(c) for c in d["covered"]], str(d["status"]), float(d["progress"]), int(d["stall"]),
                   None if d["achieved_at"] is None else int(d["achieved_at"]))

    def array(self) -> np.ndarray:
        """``vector`` as a float64 array (converted once; not a dataclass field, not serialised)."""
        cached = self.__dict__.get("_array")
        if cached is None or len(cached) != len(self.vector):
            cached = self.__dict__["_array"] = np.asarray(self.vector, dtype=np.float64)
        return cached

    def measure(self, mean_hidden: np.ndarray | None, text: str) -> float:
        """``1/2 max(0, cos(m, g)) + 1/2 coverage`` (see module docstring)."""
        return self._progress(mean_hidden, word_coverage(self.words, text))

    def _progress(self, mean_hidden: np.ndarray | None, coverage: float) -> float:
        sim = max(0.0, centred_cosine(mean_hidden, self.array())) if mean_hidden is not None else 0.0
        if not self.words:  # nothing to cover ("be brief"): the similarity alone, so it can be achieved
            return sim
        return 0.5 * sim + 0.5 * coverage

    def update(self, mean_hidden: np.ndarray | None, text: str, threshold: float, step: int) -> bool:
        """Refresh progress and stall; returns True when the goal becomes achieved now."""
        self.covered = words_present(self.words, text.lower())
        p = self._progress(mean_hidden, sum(self.covered) / len(self.words) if self.words else 0.0)
        self.stall = 0 if p > self.progress + 0.01 else min(self.stall + 1, 4)
        self.progress = p
        if self.status == ACTIVE and p >= threshold:
            self.status, self.achieved_at = ACHIEVED, step
            return True
        return False


@dataclass
class AttentionFocus:
    type: str  # "token" | "goal" | "concept"
    target: str
    intensity: float
    novelty: float
    relevance: float
    salience: float
    duration: int  # generated tokens since first held without interruption
    position: int  # index of the word's last token in the context

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AgencyState:
    goals: list[Goal] = field(default_factory=list)
    foci: list[AttentionFocus] = field(default_factory=list)
    held_since: dict[str, int] = field(default_factory=dict)  # focus key -> global step first held
    next_goal_id: int = 1

    def active_goals(self) -> list[Goal]:
        return [g for g in self.goals if g.status == ACTIVE]

    def to_dict(self) -> dict[str, Any]:
        return {"goals": [g.to_dict() for g in self.goals], "foci": [f.to_dict() for f in self.foci],
                "held_since": dict(self.held_since), "next_goal_id": self.next_goal_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AgencyState":
        return cls([Goal.from_dict(g) for g in d["goals"]],
                   [AttentionFocus(**{k: v for k, v in f.items()}) for f in d["foci"]],
                   {str(k): int(v) for k, v in d["held_since"].items()}, int(d["next_goal_id"]))


def steering_bias(goals: list[Goal], tail: list[int], at_boundary: bool, base: float) -> dict[int, float]:
    """Token -> logit bias for the next step (see module docstring)."""
    bias: dict[int, float] = {}
    for g in goals:
        beta = base * g.priority * (1 + g.stall / 2)
        for i, (seq, needs_boundary) in enumerate(zip(g.word_tokens, g.boundary)):
            if g.covered and g.word_of and g.covered[g.word_of[i]]:
                continue  # steer towards the words still missing
            # longest proper prefix of seq that the output just produced
            k = 0
            for j in range(min(len(seq) - 1, len(tail)), 0, -1):
                if tail[-j:] == seq[:j]:
                    k = j
                    break
            if k > 0:
                b = beta * (1 + k / len(seq))
            elif at_boundary or not needs_boundary:
                b = beta / 2
            else:
                continue
            tok = seq[k]
            bias[tok] = max(bias.get(tok, 0.0), b)
    return bias


class SteeringTable:
    """``steering_bias`` as a dense (V,) tensor per step, without re-deriving it every step.

    Between two goal updates (the only moments ``stall``, ``covered`` and the goal set change) the
    bias depends on the tail only through whether the output is at a word boundary and through
    the longest proper prefix of each goal-token sequence that ends the output. Those prefixes are
    indexed by their last token, so a step costs a dict lookup and a few tuple comparisons, and
    the dense tensor of each (goal state, boundary, matched prefixes) is built once.
    """

    def __init__(self, vocab_size: int, base: float, device) -> None:
        self.V, self.base, self.device = vocab_size, base, device
        self.goals: list[Goal] = []
        self.state: tuple = ()
        self.state_id = 0  # a number per distinct goal state (the dense cache's keys hash it, not the state)
        self._state_ids: dict[tuple, int] = {(): 0}
        self._last_state_id = 0
        self.prefix_ends: dict[int, list[tuple[int, int, tuple[int, ...]]]] = {}
        self._dense: dict[tuple, torch.Tensor | None] = {}

    def reset(self, goals: list[Goal]) -> None:
        """Goal states after a goal update; the tables are rebuilt only if they changed."""
        state = tuple((g.id, g.priority, g.stall, tuple(g.covered)) for g in goals)
        self.goals = list(goals)
        if state == self.state:
            return
        self.state, self.prefix_ends = state, {}
        sid = self._state_ids.get(state)
        if sid is None:
            if len(self._state_ids) >= 512:  # bounded: the dense tensors of forgotten states go too
                self._state_ids, self._dense = {}, {}
            self._last_state_id += 1
            sid = self._state_ids[state] = self._last_state_id
        self.state_id = sid
        seq_id = 0
        for g in self.goals:
            for i, seq in enumerate(g.word_tokens):
                seq_id += 1
                if g.covered and g.word_of and g.covered[g.word_of[i]]:
                    continue
                for k in range(1, len(seq)):
                    self.prefix_ends.setdefault(seq[k - 1], []).append((seq_id, k, tuple(seq[:k])))

    def bias(self, tail: list[int], at_boundary: bool) -> torch.Tensor | None:
        """The dense bias for the next step (None: no bias), equal to ``steering_bias(goals,
        tail, at_boundary, base)`` scattered into a (V,) tensor."""
        if not self.goals:
            return None
        matched: tuple = ()
        candidates = self.prefix_ends.get(tail[-1]) if tail else None
        if candidates:
            n = len(tail)
            hits = {}
            for sid, k, prefix in candidates:
                if k <= n and (k == 1 or tuple(tail[-k:]) == prefix) and k > hits.get(sid, 0):
                    hits[sid] = k
            matched = tuple(sorted(hits.items()))
        key = (self.state_id, at_boundary, matched)  # the dense tensors outlive a goal state (stall returns to 4)
        if key not in self._dense:
            bias = steering_bias(self.goals, tail, at_boundary, self.base)
            dense = None
            if bias:
                row = np.zeros(self.V, dtype=np.float32)
                row[list(bias)] = list(bias.values())
                dense = torch.from_numpy(row).to(self.device)
            if len(self._dense) >= 512:  # many distinct prefixes: keep the cache bounded
                self._dense = {}
            self._dense[key] = dense
        return self._dense[key]


def group_words(pieces: list[str]) -> list[list[int]]:
    """Indices of tokens grouped into words: a word starts after whitespace or punctuation."""
    words: list[list[int]] = []
    current: list[int] = []
    for i, piece in enumerate(pieces):
        starts = not piece or piece[0].isspace() or not piece[0].isalnum()
        if starts and current:
            words.append(current)
            current = []
        if piece.strip() and (piece.strip()[0].isalnum() or current):
            current.append(i)
        elif piece.strip():
            words.append([i])  # punctuation on its own
    if current:
        words.append(current)
    return words


def compute_foci(pieces: list[str], token_ids: list[int], surprisal: np.ndarray, intensity: np.ndarray,
                 hidden: np.ndarray | None, goals: list[Goal], concepts_in: Callable[[list[int]], list[str]],
                 weights: tuple[float, float, float], max_foci: int, log_v: float) -> list[dict[str, Any]]:
    """Score the context's words; returns the top ``max_foci`` as dicts without duration.

    One focus per target (its most salient occurrence); equal saliences rank the earlier word first.
    """
    goal_words = {w for g in goals for w in g.words}
    groups, texts = [], []
    for idx in group_words(pieces):
        text = "".join(pieces[i] for i in idx).strip()
        if text and any(ch.isalnum() for ch in text):
            groups.append(idx)
            texts.append(text)
    if not groups:
        return []
    # Per-word sums over the (contiguous, ordered, disjoint) token runs: one reduceat per array.
    first = np.array([idx[0] for idx in groups])
    stop = np.array([idx[-1] + 1 for idx in groups])
    count = stop - first
    bounds = np.stack([first, stop], axis=1).reshape(-1)  # first_0, stop_0, first_1, ...

    def run_sums(x: np.ndarray) -> np.ndarray:
        padded = np.concatenate([x, np.zeros((1,) + x.shape[1:], dtype=x.dtype)])  # stop may equal len(x)
        return np.add.reduceat(padded, bounds, axis=0)[::2].astype(np.float64)

    novelty = np.clip(run_sums(np.asarray(surprisal, dtype=np.float64)) / count / log_v, 0.0, 1.0)
    inten_sum = run_sums(np.asarray(intensity, dtype=np.float64))
    peak = float(inten_sum.max())
    inten = np.minimum(inten_sum / peak, 1.0) if peak > 0 else np.zeros(len(groups))
    rel = np.zeros(len(groups))
    if hidden is not None and goals:
        h = run_sums(np.asarray(hidden)) / count[:, None]  # (words, D) means
        g = np.stack([g.array() for g in goals])  # (goals, D)
        norms = np.linalg.norm(h, axis=1)[:, None] * np.linalg.norm(g, axis=1)[None, :]
        cos = np.divide(h @ g.T, norms, out=np.zeros_like(norms), where=norms > 0)
        rel = np.maximum(cos.max(1), 0.0)
    in_goal = np.array([t.lower() in goal_words for t in texts])
    rel = np.where(in_goal, 1.0, rel)
    salience = weights[0] * novelty + weights[1] * rel + weights[2] * inten
    best: dict[str, dict[str, Any]] = {}
    for j in np.argsort(-salience, kind="stable"):  # most salient first; a target's first hit is its best
        idx = groups[j]
        concepts = concepts_in([token_ids[i] for i in idx])
        kind, target = ("concept", "+".join(concepts)) if concepts else (("goal" if in_goal[j] else "token"), texts[j])
        key = f"{kind}:{target}"
        if key not in best:
            best[key] = dict(type=kind, target=target, intensity=float(inten[j]), novelty=float(novelty[j]),
                             relevance=float(rel[j]), salience=float(salience[j]), position=idx[-1])
            if len(best) == max_foci:
                break
    return list(best.values())
