"""Writes the tiny corpus: short sentences from a small grammar, learnable by a tiny model.

The text is generated here (no third-party data). Run from this folder:
    python generate.py
"""

from __future__ import annotations

import random
from pathlib import Path

ANIMALS = ["fox", "cat", "dog", "owl", "hare", "wolf", "bear", "crow", "mole", "frog"]
COLOURS = ["red", "grey", "brown", "white", "black", "small", "quick", "old", "young", "calm"]
PLACES = ["the forest", "the river", "the hill", "the barn", "the field", "the lake", "the garden"]
VERBS = ["runs to", "walks to", "looks at", "sleeps near", "waits by", "jumps over", "sings in"]
TIMES = ["in the morning", "at night", "after the rain", "before dawn", "every day", "in winter"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    a, b = rng.choice(ANIMALS), rng.choice(ANIMALS)
    if kind == 0:
        return f"the {rng.choice(COLOURS)} {a} {rng.choice(VERBS)} {rng.choice(PLACES)} {rng.choice(TIMES)}."
    if kind == 1:
        return f"the {a} and the {b} meet at {rng.choice(PLACES)}, and the {a} says hello to the {b}."
    if kind == 2:
        x, y = rng.randrange(5), rng.randrange(5)
        return f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}."
    start = rng.randrange(6)
    return "counting: " + " ".join(NUMBERS[start:start + 4]) + "."


def document(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 5)))


def main() -> None:
    here = Path(__file__).parent
    for name, count, seed in (("train.txt", 3000, 1), ("valid.txt", 300, 2), ("test.txt", 300, 3)):
        rng = random.Random(seed)
        (here / name).write_text("\n".join(document(rng) for _ in range(count)) + "\n")


if __name__ == "__main__":
    main()
