"""deltakit's HTTP service: a FastAPI face on the library for an internal model registry."""
