"""Which part of a row's text may be streamed while the row is still being generated."""

from __future__ import annotations


def streamable(text: str, stops: tuple[str, ...]) -> str:
    """What of a row's text so far may be sent while it is still generated: cut at a stop string that
    appeared; without a tail that may still grow into a stop string (it would be cut) or an incomplete
    character (decoded as U+FFFD until its other bytes come)."""
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
        return text[:min(cuts)]
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return text[:len(text) - hold]
