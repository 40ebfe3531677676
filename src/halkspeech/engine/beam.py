"""Beam search and best-of-N bookkeeping on the host (pure Python): which candidates survive a step, and
which finished sequence a group returns. The device only reports each beam's top log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Beam:
    tokens: tuple[int, ...]
    sum_logprob: float
    source: int  # index of the beam it grew from (for reordering caches)


def rank(candidates: list[tuple[tuple[int, ...], float]], length_penalty: float | None) -> int:
    """Index of the best (tokens, sum_logprob): log-probability over length, or Google NMT's penalty."""

    def score(item: tuple[tuple[int, ...], float]) -> float:
        tokens, logprob = item
        length = len(tokens)
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        return logprob / penalty if penalty else logprob

    scores = [score(c) for c in candidates]
    return max(range(len(scores)), key=scores.__getitem__)


@dataclass
class BeamSearch:
    """One request's beams. `step` consumes each beam's top (beam_size + 1) tokens and log-probs."""

    beam_size: int
    eot: int
    patience: float = 1.0
    beams: list[Beam] = field(default_factory=list)
    finished: dict[tuple[int, ...], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.max_candidates = max(1, round(self.beam_size * self.patience))
        if not self.beams:
            self.beams = [Beam((), 0.0, i) for i in range(self.beam_size)]

    def step(self, top_tokens: list[list[int]], top_logprobs: list[list[float]]) -> bool:
        """Advance all beams one token; returns True when enough candidates have finished."""
        scores: dict[tuple[int, ...], float] = {}
        sources: dict[tuple[int, ...], int] = {}
        for j, beam in enumerate(self.beams):
            for token, logprob in zip(top_tokens[j], top_logprobs[j], strict=True):
                sequence = (*beam.tokens, token)
                scores[sequence] = beam.sum_logprob + logprob
                sources[sequence] = j
        survivors: list[Beam] = []
        newly_finished: dict[tuple[int, ...], float] = {}
        for sequence in sorted(scores, key=scores.__getitem__, reverse=True):
            if sequence[-1] == self.eot:
                newly_finished[sequence] = scores[sequence]
            else:
                survivors.append(Beam(sequence, scores[sequence], sources[sequence]))
                if len(survivors) == self.beam_size:
                    break
        self.beams = survivors
        for sequence in sorted(newly_finished, key=newly_finished.__getitem__, reverse=True):
            if len(self.finished) >= self.max_candidates:
                break
            self.finished[sequence] = newly_finished[sequence]
        return self.done

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.max_candidates

    def best(self, length_penalty: float | None) -> tuple[tuple[int, ...], float]:
        """The chosen sequence (end-of-text stripped) and its log-probability; unfinished beams fill in."""
        pool = dict(self.finished)
        for beam in sorted(self.beams, key=lambda b: b.sum_logprob, reverse=True):
            if len(pool) >= self.beam_size:
                break
            pool[(*beam.tokens, self.eot)] = beam.sum_logprob
        candidates = [(seq[:-1] if seq and seq[-1] == self.eot else seq, lp) for seq, lp in pool.items()]
        return candidates[rank(candidates, length_penalty)]
