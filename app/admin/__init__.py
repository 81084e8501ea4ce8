"""The admin side: sign-in by emailed link, background jobs, schedules and broadcasts, subscribers and their
import and export, mailings' ledgers."""
from app.admin import auth, exports, imports, mailings, routes, subscribers  # noqa: F401  (their views register on bp)
from app.admin.blueprint import bp  # noqa: F401
