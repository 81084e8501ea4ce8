from flask import render_template
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, TooManyRequests

from app.errors.blueprint import bp
from app.extensions import db


@bp.app_errorhandler(CSRFError)
def csrf_error(error):
    return render_template('errors/error.html', code=400, title='Form expired',
                           message='The form was missing its security token or had expired. '
                                   'Please reload the page and try again.'), 400


@bp.app_errorhandler(TooManyRequests)
def too_many_requests(error):
    return render_template('errors/error.html', code=429, title='Too many requests',
                           message='Too many attempts from here, or for this address. Please wait a while and '
                                   'try again.'), 429


@bp.app_errorhandler(HTTPException)
def http_error(error):
    if error.code >= 500:
        db.session.rollback()  # the failed request may have left the session mid-transaction
    return render_template('errors/error.html', code=error.code, title=error.name,
                           message=error.description), error.code
