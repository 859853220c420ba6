"""What a deployment configures about the web apps, and the `surge serve` flags that set it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from surge.apps import AppsFeature

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "AppsPlugin",
    "AppsSettings",
    "add_apps_args",
    "apps_settings_from_args",
]

DEFAULT_SYSTEM_PROMPT = (
    "You are the customer-support assistant of this service. Answer politely, briefly and "
    "accurately. If you do not know the answer or the request needs a person (refunds, account "
    "changes), say so and tell the customer how to reach the support team.")
_UPSTREAM_SCHEMES = ("http://", "https://")


@dataclass
class AppsSettings:
    """Every field has a safe default: ``AppsSettings()`` is the UI with SQLite history in the
    user's data folder, talking to the server it is mounted on."""

    database_url: str | None = None  # None: SQLite in $SURGE_DATA_DIR or the user data folder
    history: bool = True  # False: store nothing at all
    # OpenAI-compatible base URL (without /v1) the apps call; None: the server's own address.
    upstream: str | None = None
    chat_system_prompt: str = DEFAULT_SYSTEM_PROMPT
    chat_max_tokens: int = 512
    chat_history_messages: int = 20  # earlier messages sent with each new one
    api_keys: list[str] = field(default_factory=list)  # when set, /api/apps needs one too

    def __post_init__(self) -> None:
        if self.database_url is not None:
            from surge.apps.storage import normalize_database_url

            normalize_database_url(self.database_url)  # a bad URL fails before the model loads
        if self.upstream is not None:
            if not self.upstream.startswith(_UPSTREAM_SCHEMES):
                raise ValueError(f"--apps-upstream {self.upstream!r} is invalid: allowed is an "
                                 "http(s) base URL, e.g. http://127.0.0.1:8000")
            self.upstream = self.upstream.rstrip("/").removesuffix("/v1")
        for name, value in [("chat_max_tokens", self.chat_max_tokens),
                            ("chat_history_messages", self.chat_history_messages)]:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value} is invalid: allowed is "
                                 "an integer >= 1")


def add_apps_args(parser: argparse.ArgumentParser) -> None:
    """The `web apps` flag group of `surge serve`."""
    apps = parser.add_argument_group("web apps (support chat, writing assistant, image "
                                     "recognition, status page at /)")
    apps.add_argument("--no-apps", dest="apps", action="store_false",
                      help="serve no web UI at / and no /api/apps endpoints")
    apps.add_argument("--database-url", default=None, metavar="URL",
                      help="where conversations and generations are stored: sqlite:///PATH or "
                           "postgresql://USER@HOST/DB (default: SQLite file apps.db in "
                           "$SURGE_DATA_DIR or the user data folder)")
    apps.add_argument("--no-history", dest="history", action="store_false",
                      help="store nothing: chat works within a page, history endpoints say "
                           "history is disabled")
    apps.add_argument("--apps-upstream", default=None, metavar="URL",
                      help="OpenAI-compatible base URL the apps send requests to (default: "
                           "this server's own address)")
    prompt = apps.add_mutually_exclusive_group()
    prompt.add_argument("--chat-system-prompt", default=None, metavar="TEXT",
                        help="system prompt of the support chat: policies, FAQ snippets")
    prompt.add_argument("--chat-system-prompt-file", default=None, metavar="PATH",
                        help="read the support chat's system prompt from this UTF-8 file")
    apps.add_argument("--chat-max-tokens", type=int, default=512,
                      help="longest chat answer in tokens (default 512)")


def apps_settings_from_args(args: argparse.Namespace, api_keys: list[str]) -> AppsSettings:
    prompt = args.chat_system_prompt
    if args.chat_system_prompt_file:
        path = Path(args.chat_system_prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-system-prompt-file {path} does not exist")
        prompt = path.read_text(encoding="utf-8").strip()
    return AppsSettings(
        database_url=args.database_url, history=args.history, upstream=args.apps_upstream,
        chat_system_prompt=prompt if prompt is not None else DEFAULT_SYSTEM_PROMPT,
        chat_max_tokens=args.chat_max_tokens, api_keys=list(api_keys))


class AppsPlugin:
    """The web apps as a plug-in of ``surge serve``: on unless ``--no-apps``."""

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        add_apps_args(parser)

    def from_args(self, args: argparse.Namespace, settings: Any,
                  model_dir: str) -> AppsFeature | None:
        if not args.apps:
            return None
        from surge.apps import AppsFeature  # FastAPI, SQLAlchemy: only when on

        return AppsFeature(apps_settings_from_args(args, settings.api_keys))
