// The admin page, live: every data-poll-ms, fetch /admin/live.json (the fleet, and the page's tables rendered
// from it by the server) and swap the tables in place, so ages and states move without a reload.
(function () {
  "use strict";
  var stamp = document.getElementById("admin-updated");
  var target = document.getElementById("fleet");
  if (!stamp || !target) return;
  var src = stamp.getAttribute("data-src");
  var every = parseInt(stamp.getAttribute("data-poll-ms"), 10) || 2000;

  function poll() {
    fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (data) {
        target.innerHTML = data.html;
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
        stamp.classList.remove("error");
      })
      .catch(function (err) {
        stamp.textContent = "update failed at " + new Date().toLocaleTimeString() + " (" + err.message + "); retrying";
        stamp.classList.add("error");
      })
      .then(function () { setTimeout(poll, every); });
  }
  setTimeout(poll, every);
})();
