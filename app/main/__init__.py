"""The public side: sign up, confirm, unsubscribe."""
from app.main import routes  # noqa: F401  (their views register on bp)
from app.main.blueprint import bp  # noqa: F401
