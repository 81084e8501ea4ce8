"""The blueprint its views register on, apart from the package, which imports them."""
from flask import Blueprint

bp = Blueprint('errors', __name__)
