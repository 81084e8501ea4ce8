"""Application factory: builds the app and binds each subsystem through its own init_app."""
import logging
from pathlib import Path

from flask import Flask

from config import Config, check_ranges


def create_app(config_class=Config):
    from app import (addresses, broadcasts, database, drip, email, exports, imports, jobs, limits, links,  # noqa: F401
                     models, retention, schedules, security, transports, webhooks)
    from app.admin import bp as admin_bp
    from app.cli import bp as cli_bp
    from app.errors import bp as errors_bp
    from app.extensions import csrf, db, login, mail, migrate
    from app.main import bp as main_bp
    from app.main import email as main_email

    app = Flask(__name__, instance_relative_config=True, instance_path=config_class.INSTANCE_PATH)
    app.config.from_object(config_class)
    check_ranges(app.config)
    # The SQLite file, the key, the mail folder: the owner's only (app/retention.py).
    Path(app.instance_path).mkdir(mode=0o700, parents=True, exist_ok=True)

    database.init_app(app)
    addresses.init_app(app)
    security.init_app(app)
    limits.init_app(app)
    links.init_app(app)
    db.init_app(app)
    migrate.init_app(app, db)
    mail.init_app(app)
    transports.init_app(app)
    csrf.init_app(app)
    login.init_app(app)
    drip.init_app(app)
    jobs.init_app(app, tasks=(email.send_email, main_email.send_confirmation, drip.send_stage,
                              broadcasts.send_broadcast, retention.clean_up, exports.export_subscribers,
                              imports.import_subscribers),
                  clock=(schedules.fire_due_schedules, retention.queue_clean_up))
    schedules.init_app(app)
    webhooks.init_app(app)

    app.register_blueprint(errors_bp)
    app.register_blueprint(main_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(cli_bp)
    app.register_blueprint(webhooks.bp)

    if not app.debug and not app.testing:
        app.logger.setLevel(logging.INFO)
    return app
