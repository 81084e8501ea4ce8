"""The subscriber exports' page: start one, watch it, download it while it is kept (app/exports.py)."""
import sqlalchemy as sa
from flask import abort, flash, redirect, render_template, request, send_file, url_for
from flask_login import current_user

from app import exports
from app.admin.blueprint import bp
from app.extensions import db
from app.models import Job


@bp.route('/exports', methods=['GET', 'POST'])
def export_list():
    """GET lists the exports; POST starts one (CSRF-checked like every form)."""
    if request.method == 'POST':
        job_id = exports.export_subscribers.apply(admin=current_user.email)
        db.session.commit()
        flash(f'The export is job {job_id}: it is emailed to {current_user.email} when done, and downloadable here.')
        return redirect(url_for('admin.export_list'))
    jobs = db.session.scalars(sa.select(Job).where(Job.task == 'export_subscribers').order_by(Job.id.desc())
                              .limit(20)).all()
    return render_template('admin/exports.html', title='Exports', jobs=jobs,
                           downloads={job.id: exports.download(job) is not None for job in jobs})


@bp.route('/exports/<int:job_id>/download')
def export_download(job_id):
    """:raise 410: once the file is no longer kept."""
    job = db.get_or_404(Job, job_id)
    if job.task != 'export_subscribers':
        abort(404)
    path = exports.download(job)
    if path is None:
        abort(410, f'This export was withdrawn: {why}; start a new one.' if (why := exports.withdrawn(job))
              else 'This export is no longer kept; start a new one.')
    return send_file(path, as_attachment=True, download_name=path.name)
