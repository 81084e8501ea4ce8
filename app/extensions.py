"""The Flask extensions, unbound: the bottom of the package, which any module may import without
reaching up into the factory (app/__init__.py binds them to an app)."""
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_mail import Mail
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import MetaData

# Named constraints, so later migrations can alter them (SQLite's batch mode needs the names).
db = SQLAlchemy(metadata=MetaData(naming_convention={
    'ix': 'ix_%(column_0_label)s',
    'uq': 'uq_%(table_name)s_%(column_0_name)s',
    'ck': 'ck_%(table_name)s_%(constraint_name)s',
    'fk': 'fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s',
    'pk': 'pk_%(table_name)s',
}))
migrate = Migrate(render_as_batch=True)
limiter = Limiter(get_remote_address)  # per client address; limits per email address name their own key
mail = Mail()
csrf = CSRFProtect()
login = LoginManager()
login.login_view = 'admin.login_page'
login.login_message = 'Please sign in to see the admin pages.'
