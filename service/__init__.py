"""embserve HTTP service: hosts ``compression`` tables behind a FastAPI app."""

__version__ = "0.1.0"
