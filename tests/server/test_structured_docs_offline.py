"""/docs works without internet: Swagger UI's script and stylesheet come from the server."""

from __future__ import annotations

from starlette.testclient import TestClient

from surge.server.app import ServerSettings, build_app


def test_docs_page_and_its_assets_are_served_locally() -> None:
    with TestClient(build_app(ServerSettings(model_names=["none"]))) as http:
        page = http.get("/docs")
        assert page.status_code == 200
        assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[1]
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert f"/docs/assets/{asset}" in page.text
            served = http.get(f"/docs/assets/{asset}")
            assert served.status_code == 200 and len(served.content) > 100_000
        assert http.get("/openapi.json").json()["info"]["title"] == "Surge"
