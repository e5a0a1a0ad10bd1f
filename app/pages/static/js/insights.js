// The insights charts (Chart.js): accuracy against GPU-hours with the Pareto front drawn over the other
// submissions, and one scatter of accuracy per varying hyperparameter (a category axis for a categorical one,
// a log axis for one searched over decades). The data is the page's #insights-data JSON, already cut down
// by the server to what this reader may see; nothing here decides visibility.
(function () {
  "use strict";
  var source = document.getElementById("insights-data");
  if (!source || typeof Chart === "undefined") return;
  var data = JSON.parse(source.textContent);
  var FRONT = "#cf222e", OTHER = "rgba(11, 99, 197, 0.55)";

  function label(p, xText) {
    var who = p.team ? p.team + (p.submission_id ? " (#" + p.submission_id + ")" : "") + ": " : "";
    return who + p.y.toFixed(2) + "% at " + xText;
  }

  function scatter(canvas, datasets, xScale, yTitle, tooltip) {
    return new Chart(canvas, {
      type: "scatter",
      data: { datasets: datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        plugins: {
          legend: { display: datasets.length > 1 },
          tooltip: { callbacks: { label: function (ctx) { return tooltip(ctx.raw); } } }
        },
        scales: { x: xScale, y: { grace: "5%", title: { display: true, text: yTitle } } },
        layout: { padding: 12 }
      }
    });
  }

  // Accuracy against cost, the front as a line through its points from cheapest to dearest.
  var pareto = document.getElementById("chart-pareto");
  if (pareto) {
    var front = data.pareto.filter(function (p) { return p.front; })
      .sort(function (a, b) { return a.x - b.x || b.y - a.y; });
    var rest = data.pareto.filter(function (p) { return !p.front; });
    scatter(pareto, [
      { label: "Pareto front", data: front, showLine: true, stepped: "before", borderColor: FRONT,
        backgroundColor: FRONT, pointRadius: 5, order: 0 },
      { label: "other submissions", data: rest, borderColor: OTHER, backgroundColor: OTHER, pointRadius: 3,
        order: 1 }
    ], { type: "linear", grace: "5%", title: { display: true, text: data.hours_unit } }, "public accuracy (%)",
    function (p) { return label(p, p.x.toPrecision(3) + " " + data.hours_unit); });
  }

  // Accuracy against each hyperparameter.
  data.params.forEach(function (param) {
    var canvas = document.querySelector('.param-chart canvas[data-param="' + param.name + '"]');
    if (!canvas) return;
    var x = param.kind === "categorical"
      ? { type: "category", labels: param.labels, offset: true }
      : param.log ? { type: "logarithmic", ticks: { maxTicksLimit: 6 } } : { type: "linear", grace: "5%" };
    x.title = { display: true, text: param.name };
    scatter(canvas, [{ label: param.name, data: param.points, borderColor: OTHER, backgroundColor: OTHER,
      pointRadius: 3 }], x, "public accuracy (%)",
    function (p) { return label(p, param.name + " = " + p.x); });
  });
})();
