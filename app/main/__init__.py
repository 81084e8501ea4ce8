"""The public side: sign up, confirm, unsubscribe."""
from flask import Blueprint

bp = Blueprint('main', __name__)

from app.main import routes  # noqa: E402,F401
