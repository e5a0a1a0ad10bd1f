// The live pages' one polling loop: every intervalMs, GET url as JSON with the page's cookie (the token never
// reaches JS) and hand the body to onData; stop once stopWhen(body) is true. After a failure, wait
// intervalMs * backoff and try again. With a stamp element, say when the last poll landed ("updated 14:05:09")
// or why it failed (class "error" until the next success).
//   window.hparena.poll({url, intervalMs, onData, stopWhen, backoff, stamp})
(function () {
  "use strict";
  var hparena = window.hparena = window.hparena || {};

  hparena.poll = function (opts) {
    var every = opts.intervalMs || 2000;
    var backoff = opts.backoff || 1;
    var stamp = opts.stamp;

    function tick() {
      fetch(opts.url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
        .then(function (r) {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then(function (data) {
          opts.onData(data);
          if (stamp) {
            stamp.textContent = "updated " + new Date().toLocaleTimeString();
            stamp.classList.remove("error");
          }
          return opts.stopWhen && opts.stopWhen(data) ? null : every;
        })
        .catch(function (err) {
          if (stamp) {
            stamp.textContent = "update failed at " + new Date().toLocaleTimeString() + " (" + err.message +
              "); retrying";
            stamp.classList.add("error");
          }
          return every * backoff;
        })
        .then(function (wait) { if (wait !== null) setTimeout(tick, wait); });
    }
    setTimeout(tick, every);
  };
})();
