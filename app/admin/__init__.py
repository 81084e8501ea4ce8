"""The admin side: sign-in by emailed link, background jobs, schedules and broadcasts."""
from app.admin import auth, exports, mailings, routes, subscribers  # noqa: F401  (their views register on bp)
from app.admin.blueprint import bp  # noqa: F401
