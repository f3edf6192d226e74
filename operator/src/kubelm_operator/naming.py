"""Deterministic, DNS-safe names and label values for the objects the operator creates.

A child's name is its owner's name plus a suffix. When that does not fit the limit
of the child's kind, the owner's part is cut and a short hash of the full name keeps
two long owners apart; the same owner always gets the same name.
"""

from __future__ import annotations

import hashlib
import re

DNS_LABEL_MAX = 63
JOB_NAME_MAX = 52
"""Indexed Job pods are named <job>-<index>-<5 random characters> and their hostname is
<job>-<index>: 52 leaves room for the index and keeps the pod name a valid label."""
HASH_LENGTH = 8

_INVALID = re.compile(r"[^a-z0-9-]+")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def child_name(owner: str, suffix: str, limit: int = DNS_LABEL_MAX, *, start_with_letter: bool = False) -> str:
    """<owner>-<suffix> within `limit` characters; the suffix is always kept whole."""
    full = f"{owner}-{suffix}"
    cleaned = _INVALID.sub("-", full.lower()).strip("-")
    if start_with_letter and not cleaned[:1].isalpha():
        cleaned = f"x-{cleaned}"
    if cleaned == full and len(full) <= limit:
        return full
    room = limit - len(suffix) - HASH_LENGTH - 2
    head = _INVALID.sub("-", owner.lower()).strip("-")[:room].rstrip("-")
    if start_with_letter and not head[:1].isalpha():
        head = f"x{head}"[:room].rstrip("-")
    return f"{head}-{_digest(owner)}-{suffix}" if head else f"x{_digest(owner)}-{suffix}"


def label_value(text: str) -> str:
    """A valid label value (at most 63 characters of alphanumerics, '-', '_', '.')."""
    if len(text) <= DNS_LABEL_MAX and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    head = cleaned[: DNS_LABEL_MAX - HASH_LENGTH - 1].rstrip("-_.")
    return f"{head}-{_digest(text)}" if head else _digest(text)
