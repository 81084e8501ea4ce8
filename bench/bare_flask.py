"""The bare Flask endpoint that bench/signups.py measures the app against, under the same gunicorn settings:
what a request costs this machine when the app does nothing (`gunicorn bench.bare_flask:app`)."""
from flask import Flask

app = Flask(__name__)


@app.route('/', methods=['GET', 'POST'])
def index():
    return 'ok'
