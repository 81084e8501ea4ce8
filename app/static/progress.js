// Live progress for the admin pages: each element marked data-job-progress polls its job's JSON
// (admin.job_state) every two seconds until the job is over, and updates its cells, and an export's download.
// Without JavaScript the page still shows each job's state as of its loading.
(function () {
  'use strict';
  var OVER = ['done', 'failed', 'cancelled', 'skipped'];

  // A finished export's file, added to the page's list of downloads if it has one and lacks it.
  function offer(download) {
    var list = document.getElementById('downloads');
    if (!list || list.querySelector('a[href="' + download.url + '"]')) { return; }
    var item = document.createElement('li'), link = document.createElement('a');
    link.href = download.url;
    link.textContent = download.file;
    item.appendChild(link);
    item.appendChild(document.createTextNode(download.about));
    list.insertBefore(item, list.firstChild);
  }

  function poll(row) {
    fetch(row.dataset.url, {credentials: 'same-origin', headers: {'Accept': 'application/json'}})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (job) {
        if (!job) { return; }
        ['status', 'progress', 'attempts', 'times', 'outcome'].forEach(function (name) {
          row.querySelector('.' + name).textContent = job[name];
        });
        row.querySelector('.outcome').classList.toggle('error', Boolean(job.error));
        if (job.download) { offer(job.download); }
        if (OVER.indexOf(job.status) === -1) { setTimeout(function () { poll(row); }, 2000); }
      });
  }

  document.querySelectorAll('[data-job-progress]').forEach(function (row) {
    if (OVER.indexOf(row.querySelector('.status').textContent.trim()) === -1) { poll(row); }
  });
}());
