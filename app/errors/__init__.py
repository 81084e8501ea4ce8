"""Error pages: every failure a visitor can cause gets a page that says what happened, never a bare 500."""
from flask import Blueprint

bp = Blueprint('errors', __name__)

from app.errors import handlers  # noqa: E402,F401
