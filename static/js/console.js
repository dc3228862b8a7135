// Times in the reader's zone. The server only knows UTC, so each <time datetime="…Z"> it
// renders (templates/_macros.html) is rewritten here: the time alone for today, the date too
// for any other day, and both zones on hover. Content arriving later (htmx swaps, live
// frames over the socket) is formatted as it lands.
(function () {
  "use strict";
  var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;

  function sameDay(a, b) {
    return (
      a.getFullYear() === b.getFullYear() &&
      a.getMonth() === b.getMonth() &&
      a.getDate() === b.getDate()
    );
  }

  function format(element) {
    var raw = element.getAttribute("datetime") || "";
    // Dates without a time ("2026-12-06") are days, not instants: nothing to convert.
    if (raw.indexOf("T") < 0) return;
    var moment = new Date(raw);
    if (isNaN(moment.getTime())) return;
    var now = new Date();
    var options = { hour: "2-digit", minute: "2-digit" };
    if (element.hasAttribute("data-seconds")) options.second = "2-digit";
    if (!sameDay(moment, now)) {
      options.day = "numeric";
      options.month = "short";
      if (moment.getFullYear() !== now.getFullYear()) options.year = "numeric";
    }
    element.textContent = new Intl.DateTimeFormat(undefined, options).format(moment);
    var full = new Intl.DateTimeFormat(undefined, {
      dateStyle: "medium",
      timeStyle: "long",
    }).format(moment);
    var utc = raw.replace("T", " ").replace(/(\.\d+)?(Z|[+-]00:00)$/, "") + " UTC";
    element.title = full + " (" + zone + ") · " + utc;
    element.setAttribute("data-local", zone);
  }

  function formatWithin(root) {
    if (!root || !root.querySelectorAll) return;
    if (root.matches && root.matches("time[datetime]")) format(root);
    root.querySelectorAll("time[datetime]").forEach(format);
  }

  document.addEventListener("DOMContentLoaded", function () {
    formatWithin(document.body);
    // Live frames are out-of-band swaps that need not fire a settle event on their target:
    // watching the document catches every way a row can arrive.
    new MutationObserver(function (records) {
      records.forEach(function (record) {
        record.addedNodes.forEach(function (node) {
          if (node.nodeType === 1) formatWithin(node);
        });
      });
    }).observe(document.body, { childList: true, subtree: true });
  });
  document.addEventListener("htmx:after:settle", function (event) {
    formatWithin(event.target);
  });
})();
