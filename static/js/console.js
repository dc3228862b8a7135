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

// Keyboard shortcuts, listed in the "?" dialog of templates/base.html. None fires while the
// reader types in a field or holds Alt/Meta (the browser's own shortcuts), except Ctrl-K,
// which is meant to work from anywhere.
(function () {
  "use strict";
  var GO_PENDING_MS = 1500;
  var goPendingUntil = 0;

  function typing(target) {
    if (!target || target.nodeType !== 1) return false;
    if (target.isContentEditable) return true;
    var tag = target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT";
  }

  function focusSearch() {
    var box = document.getElementById("site-search-q");
    if (!box) return false;
    // On a phone the header wraps; the box is always shown, so focus is enough.
    box.focus();
    box.select();
    return true;
  }

  function openHelp() {
    var help = document.getElementById("shortcuts-help");
    if (!help || help.open) return false;
    help.showModal();
    return true;
  }

  function goTo(letter) {
    var help = document.getElementById("shortcuts-help");
    var target = help && help.getAttribute("data-go-" + letter);
    if (!target) return false;
    window.location.assign(target);
    return true;
  }

  // Items that j/k move through: rows marked data-nav-item, in page order, that are shown.
  function items() {
    return Array.prototype.filter.call(
      document.querySelectorAll("[data-nav-item]"),
      function (item) {
        return item.getClientRects().length > 0;
      }
    );
  }

  function move(step) {
    var list = items();
    if (!list.length) return false;
    var current = list.findIndex(function (item) {
      return item.classList.contains("is-selected");
    });
    var next = current < 0 ? (step > 0 ? 0 : list.length - 1) : current + step;
    next = Math.max(0, Math.min(list.length - 1, next));
    if (current >= 0) list[current].classList.remove("is-selected");
    var item = list[next];
    item.classList.add("is-selected");
    // Focusing the item's link shows where the reader is and makes Enter open it natively.
    var link = item.querySelector("a[href]");
    (link || item).focus();
    item.scrollIntoView({ block: "nearest" });
    return true;
  }

  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.isComposing) return;
    var key = event.key;
    if ((event.ctrlKey || event.metaKey) && !event.altKey && (key === "k" || key === "K")) {
      if (focusSearch()) event.preventDefault();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) return;
    var help = document.getElementById("shortcuts-help");
    if (help && help.open) return;
    var handled = false;
    if (Date.now() < goPendingUntil) {
      goPendingUntil = 0;
      if (key === "c" || key === "d" || key === "p") handled = goTo(key);
    } else if (key === "g") {
      goPendingUntil = Date.now() + GO_PENDING_MS;
      handled = true;
    } else if (key === "/") {
      handled = focusSearch();
    } else if (key === "?") {
      handled = openHelp();
    } else if (key === "j") {
      handled = move(1);
    } else if (key === "k") {
      handled = move(-1);
    }
    if (handled) event.preventDefault();
  });
})();
