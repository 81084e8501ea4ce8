"""The WSGI entry point (`flask --app main run`, `gunicorn main:app`)."""
import sqlalchemy as sa
import sqlalchemy.orm as so

from app import create_app
from app.extensions import db
from app.models import Broadcast, Client, Delivery, Job

app = create_app()


@app.shell_context_processor
def make_shell_context():
    return {'sa': sa, 'so': so, 'db': db, 'Client': Client, 'Delivery': Delivery, 'Broadcast': Broadcast,
            'Job': Job}
