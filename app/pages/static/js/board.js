// The board, live: every data-poll-ms, fetch board.json (the same board the API gives this viewer, and its
// rows rendered by the server) and swap the rows in place. No reload, so a projected page never flickers.
(function () {
  "use strict";
  var stamp = document.getElementById("board-updated");
  var rows = document.getElementById("board-rows");
  if (!stamp || !rows) return;
  var src = stamp.getAttribute("data-src");
  var every = parseInt(stamp.getAttribute("data-poll-ms"), 10) || 2000;

  function text(id, value) {
    var el = document.getElementById(id);
    if (el) el.textContent = value;
  }

  function poll() {
    fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (data) {
        rows.innerHTML = data.rows_html;
        text("board-name", data.board.board);
        text("board-phase", data.board.phase);
        // computed_at is UTC ISO: print it as the page first did ("2025-03-01 14:05 UTC").
        text("board-computed", data.board.computed_at.slice(0, 16).replace("T", " ") + " UTC");
        var stale = document.getElementById("board-stale");
        if (stale) stale.hidden = !data.board.stale;
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
