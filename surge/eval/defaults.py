"""Defaults of `surge eval`, in a module light enough for the command-line parser."""

__all__ = ["DEFAULT_CONTEXT_LENGTH", "DEFAULT_MAX_TOKENS"]

# Tokens of text fed to perplexity, and the window: 3 windows of 2048 tokens, about 20 s for a
# 135M model in bf16 on 2 cores. A multiple of the stride, so no window scores a short tail.
DEFAULT_MAX_TOKENS = 4096
DEFAULT_CONTEXT_LENGTH = 2048
