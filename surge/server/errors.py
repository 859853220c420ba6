"""Moved to ``surge.http.errors`` (and ``surge.http.handlers``); kept while the router still
imports this path."""

from surge.http.errors import APIError, error_body, error_response, sse_error_event
from surge.http.handlers import install_error_handlers

__all__ = ["APIError", "error_body", "error_response", "install_error_handlers",
           "sse_error_event"]
