"""The writing assistant: templates x tone x length become one chat request.

Repeats are answered by the server's response cache (surge.cache), which caches only requests
whose output is a function of the request (greedy, or a fixed seed) and keys them by the
rendered prompt, so editing a template here never serves answers written for the old wording.
The app sends the user as the request's ``user``, the cache's tenant: a cache shared by
everyone would tell user B, by an instant ``cached: true``, that someone sent the very same
private request before.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LENGTHS", "TEMPLATES", "TONES", "Template", "build_prompt"]


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
