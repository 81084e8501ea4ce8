// Live progress for the admin pages: each element marked data-job-progress polls its job's JSON
// (admin.job_state) every two seconds until the job is over, and updates its status and progress cells.
// Without JavaScript the page still shows each job's state as of its loading.
(function () {
  'use strict';
  var OVER = ['done', 'failed', 'cancelled', 'skipped'];

  function poll(row) {
    fetch(row.dataset.url, {credentials: 'same-origin', headers: {'Accept': 'application/json'}})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (job) {
        if (!job) { return; }
        row.querySelector('.status').textContent = job.status;
        row.querySelector('.progress').textContent = job.progress;
        if (job.error) { row.querySelector('.outcome').textContent = job.error; }
        if (OVER.indexOf(job.status) === -1) { setTimeout(function () { poll(row); }, 2000); }
      });
  }

  document.querySelectorAll('[data-job-progress]').forEach(function (row) {
    if (OVER.indexOf(row.querySelector('.status').textContent.trim()) === -1) { poll(row); }
  });
}());
