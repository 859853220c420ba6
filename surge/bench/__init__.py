"""`surge bench`: a load generator for OpenAI-compatible servers.

Import from the submodules (``surge.bench.runner``, ``surge.bench.fake_server``, ...); this
package stays empty so that the CLI can import ``surge.bench.cli`` without aiohttp or numpy.
"""

__all__: list[str] = []
