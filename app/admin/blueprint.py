"""The blueprint its views register on, apart from the package, which imports them."""
from flask import Blueprint

bp = Blueprint('admin', __name__, url_prefix='/admin')
