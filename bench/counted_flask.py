"""`flask ...` exactly as a user runs it, plus a count of the SQL statements it sends, printed last."""
import atexit
import sys

import sqlalchemy as sa
from flask.cli import main
from sqlalchemy.engine import Engine

statements = 0


@sa.event.listens_for(Engine, 'before_cursor_execute')
def _count(*args):
    global statements
    statements += 1


atexit.register(lambda: print(f'sql statements: {statements}', file=sys.stderr))
sys.argv = ['flask', '--app', 'main', *sys.argv[1:]]
main()
