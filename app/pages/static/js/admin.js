// The admin page, live: every data-poll-ms, fetch /admin/live.json (the fleet, and the page's tables rendered
// from it by the server) and swap the tables in place, so ages and states move without a reload.
(function () {
  "use strict";
  var stamp = document.getElementById("admin-updated");
  var target = document.getElementById("fleet");
  if (!stamp || !target) return;
  window.hparena.poll({
    url: stamp.getAttribute("data-src"),
    intervalMs: parseInt(stamp.getAttribute("data-poll-ms"), 10),
    stamp: stamp,
    onData: function (data) { target.innerHTML = data.html; }
  });
})();
