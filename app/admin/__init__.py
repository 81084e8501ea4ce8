"""The admin side: sign-in by emailed link, background jobs, schedules and broadcasts."""
from flask import Blueprint

bp = Blueprint('admin', __name__, url_prefix='/admin')

from app.admin import auth, routes  # noqa: E402,F401
