"""`moee serve`: an OpenAI-compatible embeddings server with MoEE's own routes.

Needs the serve extra (`pip install moee-fast[serve]`: FastAPI, uvicorn, prometheus_client).
This package imports without it, so the `moee` command can list `serve`; `create_app` and
`ServeConfig` raise an ImportError naming the extra when it is missing.
"""

from __future__ import annotations

REQUIRED = ("fastapi", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install moee-fast[serve]"


def require_extra() -> None:
    """Raise an ImportError naming the serve extra unless its packages import."""
    import importlib

    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"moee serve needs {', '.join(missing)}: {INSTALL_HINT}")


def __getattr__(name):
    if name in ("create_app", "ServeConfig"):
        require_extra()
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_app", "ServeConfig", "require_extra"]
