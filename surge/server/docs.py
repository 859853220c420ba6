"""``/docs`` that works offline: Swagger UI's script and stylesheet are served by the server.

FastAPI's default page loads Swagger UI from a CDN, so without internet access (an air-gapped
cluster, a laptop on a plane) ``/docs`` is blank. The assets come from ``swagger-ui-py``, a
maintained PyPI package that ships Swagger UI's dist files (Apache-2.0, its LICENSE beside
them); we only read its ``static`` folder, without importing the package (whose import pulls
in YAML and web-framework glue that Surge does not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

__all__ = ["DOCS_ASSETS_PATH", "add_offline_docs", "swagger_ui_assets"]

DOCS_ASSETS_PATH = "/docs/assets"


def swagger_ui_assets() -> Path:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed: `pip install swagger-ui-py` "
                           "(a dependency of surge) serves /docs without a CDN")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def add_offline_docs(app: FastAPI, title: str) -> None:
    """Serve /docs from the bundled assets. Create the app with ``docs_url=None``."""
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=swagger_ui_assets()),
              name="swagger-ui-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon-32x32.png")
