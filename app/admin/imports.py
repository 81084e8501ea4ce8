"""Importing subscribers from a CSV file (app/imports.py): the upload and its dry run, the dry run's report,
and the import, started from the report as a background job whose progress the page follows."""
from flask import abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from werkzeug.exceptions import RequestEntityTooLarge

from app import imports
from app.admin.blueprint import bp
from app.admin.forms import ImportForm
from app.extensions import csrf


@bp.route('/imports/new', methods=['GET', 'POST'])
@csrf.exempt  # CSRFProtect reads the body before any view, under the app's 64 KiB; the form checks its token itself
def import_upload():
    """The upload form; a file is checked at once (the dry run) and its report shown.
    :raise 413: (as a page with the form) for a file over IMPORT_MAX_BYTES."""
    limit = current_app.config['IMPORT_MAX_BYTES']
    request.max_content_length = limit  # this request only: every other keeps MAX_CONTENT_LENGTH
    error = None
    try:
        form = ImportForm()  # reads the body
    except RequestEntityTooLarge:
        form = ImportForm(formdata=None)
        error = f'The file is larger than {limit / 2**20:g} MB, the most an import takes (IMPORT_MAX_BYTES).'
        return render_template('admin/import_upload.html', title='Import subscribers', form=form, error=error,
                               limit=limit), 413
    if form.validate_on_submit():
        try:
            upload = imports.receive(form.file.data.stream, form.file.data.filename, current_user.email,
                                     form.consented.data)
        except imports.ImportFileError as exc:
            error = f'{exc} Nothing was imported.'
        else:
            return redirect(url_for('admin.import_report', token=upload.token))
    status = 400 if error or form.errors else 200
    return render_template('admin/import_upload.html', title='Import subscribers', form=form, error=error,
                           limit=limit), status


def _upload_or_404(token):
    upload = imports.find(token)
    if upload is None:
        abort(404, 'There is no such upload: it was imported or discarded more than a day ago, withdrawn when a '
                   'subscriber it names was erased, or never made.')
    return upload


@bp.route('/imports/<token>')
def import_report(token):
    """The dry run's report, and the import's job once it has started.  :raise 404: no such upload."""
    upload = _upload_or_404(token)
    job = upload.job()
    return render_template('admin/import_report.html', title=f'Import of {upload.filename}', upload=upload,
                           report=upload.report, job=job, jobs=[job] if job else [], shown=imports.SHOWN)


@bp.route('/imports/<token>/start', methods=['POST'])
def import_start(token):
    """Queue the import (once, however often the button is pressed).  :raise 404: no such upload."""
    upload = _upload_or_404(token)
    if not upload.report.counts[imports.Outcome.ACCEPTED]:
        flash('This file has nobody to import.', 'error')
    else:
        job = imports.start(upload, current_user.email)
        flash(f'The import is job {job.id}: it adds everyone in one go, or nobody if it fails.')
    return redirect(url_for('admin.import_report', token=token))


@bp.route('/imports/<token>/discard', methods=['POST'])
def import_discard(token):
    """:raise 404: no such upload."""
    upload = _upload_or_404(token)
    if imports.discard(upload):
        flash(f'{upload.filename} is discarded: nothing was imported.')
        return redirect(url_for('admin.import_upload'))
    flash('Its import has started: the file is deleted once it is over.', 'error')
    return redirect(url_for('admin.import_report', token=token))
