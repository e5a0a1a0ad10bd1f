// The board, live: every data-poll-ms, fetch board.json (the same board the API gives this viewer, and its
// rows rendered by the server) and swap the rows in place. No reload, so a projected page never flickers.
(function () {
  "use strict";
  var stamp = document.getElementById("board-updated");
  var rows = document.getElementById("board-rows");
  if (!stamp || !rows) return;

  function text(id, value) {
    var el = document.getElementById(id);
    if (el) el.textContent = value;
  }

  window.hparena.poll({
    url: stamp.getAttribute("data-src"),
    intervalMs: parseInt(stamp.getAttribute("data-poll-ms"), 10),
    stamp: stamp,
    onData: function (data) {
      rows.innerHTML = data.rows_html;
      text("board-name", data.board.board);
      text("board-phase", data.board.phase);
      // computed_at is UTC ISO: print it as the page first did ("2025-03-01 14:05 UTC").
      text("board-computed", data.board.computed_at.slice(0, 16).replace("T", " ") + " UTC");
      var stale = document.getElementById("board-stale");
      if (stale) stale.hidden = !data.board.stale;
    }
  });
})();
