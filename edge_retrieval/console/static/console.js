// Live detections: server-sent events carry server-rendered (escaped) rows; a row with the same
// id is replaced (its final update brings the clip), a new one goes on top. No inline script.
(function () {
  "use strict";
  function start() {
    var table = document.getElementById("detections");
    if (!table || !window.EventSource) return;
    var body = document.getElementById("detection-rows");
    var url = table.dataset.stream + (table.dataset.stream.indexOf("?") < 0 ? "?" : "&") +
      "after=" + encodeURIComponent(table.dataset.after);
    var src = new EventSource(url);
    var live = document.getElementById("live");
    src.onopen = function () { if (live) live.className = "live on"; };
    src.onerror = function () { if (live) live.className = "live off"; };
    src.addEventListener("detection", function (e) {
      var tpl = document.createElement("template");
      tpl.innerHTML = e.data.trim();
      var row = tpl.content.firstElementChild;
      if (!row) return;
      var old = document.getElementById(row.id);
      if (old) {
        if (old.querySelector(".given")) return;  // keep the feedback already given
        old.replaceWith(row);
      } else {
        body.insertBefore(row, body.firstChild);
      }
      if (window.htmx) window.htmx.process(row);
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
