"""The console's routes, its static files and the API reference page (/docs), all served from this process."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import Scope

from openmaas.console import account, operator, pages, signin, work
from openmaas.console.routing import console_route
from openmaas.console.web import HERE, PREFIX, templates


class _Static(StaticFiles):
    """Static files that browsers may keep for an hour (their names change with a release's versions)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.setdefault("Cache-Control", "public, max-age=3600")
        return response


def install(app: FastAPI) -> None:
    """Mount the console under /console and the local API reference under /docs."""
    env = templates()
    route_class = console_route(env)
    for module in (signin, pages, account, work, operator):
        app.include_router(module.router(env, route_class))
    app.mount(f"{PREFIX}/static", _Static(directory=HERE / "static"), name="console-static")

    root = APIRouter(include_in_schema=False)

    @root.get("/")
    async def home() -> Response:
        return RedirectResponse(PREFIX, status_code=307)

    icon = (HERE / "static" / "favicon.svg").read_bytes()

    @root.get("/favicon.ico")
    async def favicon() -> Response:
        # Browsers ask for it on pages without an icon link (an invoice opened from the console, /docs).
        return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    @root.get("/docs")
    async def docs() -> HTMLResponse:
        # Swagger UI from the vendored files: /docs works with no network (FastAPI's default loads a CDN).
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="OpenMaaS API",
            swagger_js_url=f"{PREFIX}/static/vendor/swagger-ui-bundle.js",
            swagger_css_url=f"{PREFIX}/static/vendor/swagger-ui.css",
            swagger_favicon_url=f"{PREFIX}/static/favicon.svg",
        )

    app.include_router(root)
