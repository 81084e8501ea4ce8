"""CSV as admins open it: in a spreadsheet. A cell that starts with =, +, - or @ would be read as a
formula there (an address such as `=HYPERLINK(...)@example.com` is a valid one), so it is written with
a leading apostrophe; and rows are streamed, not built in memory first."""
import csv
import io
import itertools

FORMULA_STARTS = ('=', '+', '-', '@')


def safe_cell(value):
    text = '' if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_lines(header, rows):
    """Yield the CSV text of `header` and each row of `rows`, a line at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in itertools.chain([header], rows):
        writer.writerow([safe_cell(value) for value in row])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
