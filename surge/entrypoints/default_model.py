"""The model a command runs when the user names none.

``surge serve`` and ``surge generate`` without ``--model`` run the catalogue's chat model
(SmolLM2-135M-Instruct), pulled on first use. Where it cannot be had (no network and nothing
cached) they fall back to the built-in random-weight demo checkpoint, and say why, so the
README's first command still ends in a server that answers.
"""

from __future__ import annotations

import logging

__all__ = ["DEMO_SERVED_NAME", "default_model"]

logger = logging.getLogger("surge.models")

DEMO_SERVED_NAME = "surge-demo"


def default_model() -> tuple[str, bool]:
    """(what to pass as ``--model``, whether that is the random-weight demo)."""
    from surge import hub

    path, reason = hub.default_llm()
    if path is not None:
        logger.info("No --model given: running %s (%s)", hub.DEFAULT_LLM, path)
        return hub.DEFAULT_LLM, False
    from surge.testing.make_model import cache_dir, ensure_demo_model

    logger.warning(
        "No --model given and %s cannot be had (%s). Running the built-in demo checkpoint "
        "instead (smollm2-135m shape, RANDOM weights, so its text is gibberish), cached under "
        "%s. Once online: surge pull %s", hub.DEFAULT_LLM, reason, cache_dir(), hub.DEFAULT_LLM)
    return str(ensure_demo_model()), True
