"""gunicorn's server hooks, given to it as its config file: `gunicorn --config app/serving.py main:app`.

post_worker_init starts a worker's job threads and clock (JOB_WORKER=thread) as soon as the worker has
loaded the app, so that a quiet site runs its schedules, retries and clean-ups from its start, not from
its first visitor. Only in the workers: the master forks them, and must hold no thread when it does.

A file path rather than `python:app.serving`: gunicorn runs the file afresh in the master at each start
and reload, whereas a module of this package imported there would keep app/__init__.py, config.py and the
.env it reads as they were at the master's start, for every worker forked after a reload (SIGHUP). So the
app is imported only inside the hook, in the worker."""


def post_worker_init(worker):
    """Start the job threads of the app the worker loaded, under whatever middleware wraps it."""
    from flask import Flask

    from app.jobs import start_worker_threads

    app = worker.wsgi
    while app is not None and not isinstance(app, Flask):
        app = getattr(app, 'app', None)  # werkzeug's ProxyFix keeps what it wraps as `app`
    if app is None:  # gunicorn's error page for an app it could not load (--reload)
        worker.log.warning('no Flask app in %r: no job threads started', worker.wsgi)
    else:
        start_worker_threads(app)
