"""Error pages: every failure a visitor can cause gets a page that says what happened, never a bare 500."""
from app.errors import handlers  # noqa: F401  (their views register on bp)
from app.errors.blueprint import bp  # noqa: F401
