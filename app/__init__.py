"""Application factory: builds the app and binds each subsystem through its own init_app."""
import logging
import secrets
from pathlib import Path

from flask import Flask
from flask_login import LoginManager
from flask_mail import Mail
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Engine

from config import Config

# Named constraints, so later migrations can alter them (SQLite's batch mode needs the names).
db = SQLAlchemy(metadata=MetaData(naming_convention={
    'ix': 'ix_%(column_0_label)s',
    'uq': 'uq_%(table_name)s_%(column_0_name)s',
    'ck': 'ck_%(table_name)s_%(constraint_name)s',
    'fk': 'fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s',
    'pk': 'pk_%(table_name)s',
}))
migrate = Migrate(render_as_batch=True)
mail = Mail()
csrf = CSRFProtect()
login = LoginManager()
login.login_view = 'admin.login_page'
login.login_message = 'Please sign in to see the admin pages.'


def create_app(config_class=Config):
    app = Flask(__name__, instance_relative_config=True, instance_path=config_class.INSTANCE_PATH)
    app.config.from_object(config_class)
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    if not app.config['SECRET_KEY']:
        app.config['SECRET_KEY'] = _instance_secret_key(app)
    app.config.setdefault('MAIL_FOLDER', None)
    app.config['MAIL_FOLDER'] = app.config['MAIL_FOLDER'] or str(Path(app.instance_path) / 'mail')

    db.init_app(app)
    migrate.init_app(app, db)
    mail.init_app(app)
    _check_mail(app)
    csrf.init_app(app)
    login.init_app(app)

    from app import broadcasts, drip, jobs, schedules, tasks  # noqa: F401  (tasks register with app.jobs)
    drip.init_app(app)
    jobs.init_app(app)
    schedules.init_app(app)

    from app.errors import bp as errors_bp
    app.register_blueprint(errors_bp)
    from app.main import bp as main_bp
    app.register_blueprint(main_bp)
    from app.admin import bp as admin_bp
    app.register_blueprint(admin_bp)
    from app.cli import bp as cli_bp
    app.register_blueprint(cli_bp)

    if not app.debug and not app.testing:
        app.logger.setLevel(logging.INFO)
    return app


def _check_mail(app):
    """Say no at start-up, not at the first send: a way out chosen badly, or none for a deployment (see
    app.transports.mail_transport); and say loudly, at every start, that TLS is not being verified."""
    from app.transports import mail_transport
    if mail_transport(app.config) == 'smtp' and not app.config['MAIL_TLS_VERIFY']:
        app.logger.warning('MAIL_TLS_VERIFY is off: the certificate of %s is not checked, so anyone on the way '
                           'to it can read MAIL_PASSWORD and every email', app.config['MAIL_SERVER'])


def _instance_secret_key(app):
    """Links in emails are signed with SECRET_KEY, so the key must survive restarts and be the same for
    the web process and cron; a fresh random key per process would break every link already sent."""
    path = Path(app.instance_path) / 'secret_key'
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


@event.listens_for(Engine, 'connect')
def _sqlite_concurrency(dbapi_connection, connection_record):
    """Cron, the web process and workers share one SQLite file: WAL lets readers run beside the writer,
    and the busy timeout makes a writer wait for the lock instead of failing at once. In WAL mode,
    synchronous=NORMAL keeps every commit through a killed process (only a power cut can lose the last
    few), and spares the send log's frequent small commits a wait on the disk each."""
    if type(dbapi_connection).__module__ != 'sqlite3':
        return
    cursor = dbapi_connection.cursor()
    cursor.execute('PRAGMA journal_mode=WAL')
    cursor.execute('PRAGMA synchronous=NORMAL')
    cursor.execute('PRAGMA busy_timeout=30000')
    cursor.execute('PRAGMA foreign_keys=ON')
    cursor.close()


from app import models  # noqa: E402,F401  (models register with db.metadata for migrations)
