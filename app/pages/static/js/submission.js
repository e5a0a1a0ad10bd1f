// A submission, live: charts of each run's per-epoch train loss, public accuracy and lr (Chart.js, one line
// per run), filled in place from live.json every data-poll-ms until the submission is over; the status,
// queue position, ETA, device, precision, timings (setup and training so far while a run trains, the final
// setup / train / eval once it is over) and epoch table are swapped in from the server-rendered fragment.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var initial = document.getElementById("live-data");
  if (!live || !initial || typeof Chart === "undefined") return;
  var COLORS = ["#0b63c5", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#1b7c83", "#57606a"];

  function chart(id, label, field, percent) {
    return {
      field: field,
      percent: percent,
      chart: new Chart(document.getElementById(id), {
        type: "line",
        data: { datasets: [] },
        options: {
          animation: false,
          maintainAspectRatio: false,
          parsing: false,
          plugins: { title: { display: true, text: label }, legend: { display: true } },
          scales: {
            x: { type: "linear", title: { display: true, text: "epoch" }, ticks: { precision: 0 } },
            y: { title: { display: true, text: label } }
          }
        }
      })
    };
  }

  var charts = [
    chart("chart-loss", "train loss", "train_loss", false),
    chart("chart-accuracy", "public accuracy (%)", "test_accuracy", true),
    chart("chart-lr", "learning rate", "lr", false)
  ];

  // Update each chart's datasets in place (one per run), so Chart.js redraws without rebuilding.
  function draw(data) {
    charts.forEach(function (c) {
      var sets = c.chart.data.datasets;
      data.runs.forEach(function (run, i) {
        var points = run.epochs
          .filter(function (e) { return e[c.field] !== null && e[c.field] !== undefined; })
          .map(function (e) { return { x: e.epoch, y: c.percent ? e[c.field] * 100 : e[c.field] }; });
        if (!sets[i]) {
          var color = COLORS[i % COLORS.length];
          sets[i] = { label: run.label, data: [], borderColor: color, backgroundColor: color, pointRadius: 3 };
        }
        sets[i].label = run.label;
        sets[i].data = points;
      });
      sets.length = data.runs.length;
      c.chart.update("none");
    });
  }

  var first = JSON.parse(initial.textContent);
  draw(first);
  if (first.terminal) return;
  window.hparena.poll({
    url: live.getAttribute("data-src"),
    intervalMs: parseInt(live.getAttribute("data-poll-ms"), 10),
    backoff: 2,
    onData: function (data) {
      live.innerHTML = data.html;
      draw(data);
      live.setAttribute("data-terminal", data.terminal ? "true" : "false");
    },
    stopWhen: function (data) { return data.terminal; }
  });
})();
