"""The page at ``/``: the registry's models as a lineage tree, their revisions and sizes, and jobs with
live progress. Server-rendered; a read token, given once, is kept in an HttpOnly cookie."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from deltakit.modelstore.views import Repositories, RepoSummary
from deltakit.units import human_bytes

from ..deps import TOKEN_COOKIE, StoreDep, cookie_scope
from ..schemas import JobOut

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")
templates.env.filters["bytes"] = human_bytes


@dataclass(frozen=True)
class Node:
    """A repository on the page, with the repositories that derive from it."""

    repo: RepoSummary
    children: tuple[Node, ...]


def lineage_forest(repos: list[RepoSummary]) -> list[Node]:
    """Repositories as trees: a repository sits under the base its latest revision names; one whose
    base is not in the registry, has none, or is itself (a revision fine-tuned from an earlier one) is a
    root. Bases may still form a cycle (a later revision of ``a`` built on ``b``, of ``b`` on ``a``):
    whatever no root reaches becomes a root too, so every repository is drawn, once."""
    by_id = {r.repo_id: r for r in repos}
    children: dict[str | None, list[RepoSummary]] = {}
    for r in repos:
        base = r.latest.base_model
        parent = base if base in by_id and base != r.repo_id else None
        children.setdefault(parent, []).append(r)
    drawn: set[str] = set()

    def grow(repo: RepoSummary) -> Node:
        drawn.add(repo.repo_id)
        below = [c for c in children.get(repo.repo_id, []) if c.repo_id not in drawn]
        return Node(repo, tuple(grow(c) for c in below))

    forest = [grow(r) for r in children.get(None, [])]
    for r in repos:  # in a cycle of bases: no root reaches them
        if r.repo_id not in drawn:
            forest.append(grow(r))
    return forest


def _models(request: Request) -> Repositories | None:
    return getattr(request.app.state, "models", None)


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, store: StoreDep) -> Response:
    token = request.cookies.get(TOKEN_COOKIE)
    if cookie_scope(store, token) is None:
        return templates.TemplateResponse(request, "signin.html", {"failed": token is not None})
    models = _models(request)
    repos = list(await asyncio.to_thread(models.repositories)) if models is not None else []
    jobs = [JobOut.of(j) for j in await asyncio.to_thread(store.recent)]
    hub = str(request.base_url).rstrip("/") + "/hub"
    context = {"forest": lineage_forest(repos), "count": len(repos), "jobs": jobs, "hub": hub}
    return templates.TemplateResponse(request, "index.html", context)


def _same_site(request: Request) -> None:
    """Refuse a form posted from another site (which could sign a visitor in with someone else's token, or
    out): the browser says where a request comes from in Sec-Fetch-Site, or at least Origin."""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.url.netloc}"
    if site not in (None, "same-origin", "none") or (origin is not None and origin not in (own, "null")):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "sign in from this registry's own page")


@router.post("/signin")
def sign_in(request: Request, token: Annotated[str, Form(max_length=200)], store: StoreDep) -> Response:
    """Keep a token for the page, if it is one; the page then reads with it (never writes: a cookie is
    sent by the browser on its own, so write routes still take only the Authorization header)."""
    _same_site(request)
    response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    secure = request.url.scheme == "https"
    if cookie_scope(store, token) is not None:
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=secure, max_age=30 * 86400)
    else:
        response.set_cookie(TOKEN_COOKIE, "", httponly=True, samesite="strict", secure=secure, max_age=60)
    return response


@router.post("/signout")
def sign_out(request: Request) -> Response:
    _same_site(request)
    response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(TOKEN_COOKIE)
    return response
