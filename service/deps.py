"""Request dependencies: the app's shared objects, and bearer-token authentication by scope."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deltakit.registry import Registry

from .jobs import Runner
from .settings import Settings
from .store import Store

_bearer = HTTPBearer(auto_error=False)
# The page keeps a read token in this cookie; only read routes accept it (a browser sends cookies on its
# own, so a write needs the Authorization header: no cross-site request can write).
TOKEN_COOKIE = "deltakit_token"


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_runner(request: Request) -> Runner:
    runner: Runner = request.app.state.runner
    return runner


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _scope(store: Store, credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    scope = store.token_scope(credentials.credentials)
    if scope is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})
    return scope


def cookie_scope(store: Store, token: str | None) -> str | None:
    """The scope of the page's cookie token, or None where it is missing or no token."""
    return store.token_scope(token) if token else None


def require_read(
    request: Request,
    store: Annotated[Store, Depends(get_store)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if credentials is None and (scope := cookie_scope(store, request.cookies.get(TOKEN_COOKIE))) is not None:
        return scope
    return _scope(store, credentials)


def require_write(
    store: Annotated[Store, Depends(get_store)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if _scope(store, credentials) != "write":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token may read but not write")
    return "write"


StoreDep = Annotated[Store, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Read = Depends(require_read)
Write = Depends(require_write)
