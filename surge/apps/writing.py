"""The writing assistant: templates x tone x length become one chat request, and deterministic
requests get a cache key.

A request is cached only when its output is a function of the request: greedy decoding
(temperature 0) or a fixed seed. The key covers everything that changes the output (template,
inputs, tone, length, model, temperature, seed) and the prompt version, so editing a template
here never serves answers written for the old wording. It covers the user too: a cache shared
by everyone would tell user B, by an instant ``cached: true``, that someone sent the very same
private request before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

__all__ = ["LENGTHS", "TEMPLATES", "TONES", "Template", "build_prompt", "cache_key"]

# Bump when a template's wording changes: old cached answers then stop matching.
PROMPT_VERSION = 1


@dataclass(frozen=True)
class Template:
    name: str
    title: str
    fields: tuple[str, ...]  # inputs the user fills in; the first is required
    instruction: str  # formatted with the inputs


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("email", "Email", ("points", "recipient"),
             "Write an email to {recipient} that covers these points:\n{points}"),
    Template("story", "Story", ("premise", "audience"),
             "Write a short story for {audience} based on this premise:\n{premise}"),
    Template("outline", "Article outline", ("topic", "audience"),
             "Write an article outline with section headings and key points on this topic "
             "for {audience}:\n{topic}"),
    Template("summary", "Summary", ("text",),
             "Summarize the following text:\n{text}"),
)}
TONES = ("neutral", "formal", "friendly", "persuasive", "playful")
# Length name -> (words asked for, max_tokens allowed).
LENGTHS: dict[str, tuple[int, int]] = {"short": (80, 128), "medium": (200, 320),
                                       "long": (450, 700)}
_DEFAULTS = {"recipient": "the recipient", "audience": "a general audience"}


def check_request(template: str, inputs: dict[str, str], tone: str, length: str) -> str | None:
    """What is wrong with the request, said for the user, or None."""
    if template not in TEMPLATES:
        return f"template {template!r} is unknown: allowed are {', '.join(TEMPLATES)}"
    if tone not in TONES:
        return f"tone {tone!r} is unknown: allowed are {', '.join(TONES)}"
    if length not in LENGTHS:
        return f"length {length!r} is unknown: allowed are {', '.join(LENGTHS)}"
    spec = TEMPLATES[template]
    extra = sorted(set(inputs) - set(spec.fields))
    if extra:
        return (f"inputs {extra} do not belong to template {template!r}: allowed are "
                f"{list(spec.fields)}")
    if not inputs.get(spec.fields[0], "").strip():
        return f"inputs.{spec.fields[0]} is required for template {template!r}"
    return None


def build_prompt(template: str, inputs: dict[str, str], tone: str, length: str
                 ) -> tuple[list[dict[str, str]], int]:
    """The chat messages and max_tokens for a checked request."""
    spec = TEMPLATES[template]
    words, max_tokens = LENGTHS[length]
    values = {name: (inputs.get(name) or _DEFAULTS.get(name, "")).strip()
              for name in spec.fields}
    system = (f"You are a skilled writing assistant. Write in a {tone} tone, about {words} "
              "words. Reply with the text only.")
    return ([{"role": "system", "content": system},
             {"role": "user", "content": spec.instruction.format(**values)}], max_tokens)


def cache_key(template: str, inputs: dict[str, str], tone: str, length: str,
              model: str | None, temperature: float, seed: int | None,
              user: str) -> str | None:
    """The key of a deterministic request by ``user``, None for a sampled one (never
    cached)."""
    if temperature != 0 and seed is None:
        return None
    request = {"v": PROMPT_VERSION, "template": template, "inputs": inputs, "tone": tone,
               "length": length, "model": model, "temperature": temperature, "seed": seed,
               "user": user}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
