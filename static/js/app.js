// Console behaviour shared by every page (loaded once from base.html; no inline scripts).
(function () {
  "use strict";

  // Fragments pushed over the live socket are rendered by workers, which have no visitor
  // session and so leave the CSRF field of their forms empty. Before such a form is sent,
  // fill it with this page's token (the one htmx already sends as a header).
  document.addEventListener(
    "submit",
    function (event) {
      var form = event.target;
      var meta = document.querySelector('meta[name="csrf-token"]');
      if (!meta || !form || !form.querySelectorAll) return;
      form.querySelectorAll('input[name="csrf_token"]').forEach(function (input) {
        if (!input.value) input.value = meta.content;
      });
    },
    true
  );

  // A pushed fragment that adds an item to a list (a new generation, feed row or
  // notification, swapped in out of band with afterbegin / beforeend) can arrive after the
  // page's snapshot already showed that item: its handler ran late on a busy machine. An
  // item's id is unique on the page, so the pushed copy replaces the one shown instead of
  // showing it twice.
  var INSERTS = /^(afterbegin|beforeend|beforebegin|afterend)\b/;
  document.addEventListener("htmx:ws:before:message:incoming", function (event) {
    var message = event.detail && event.detail.message;
    var data = message && message.data;
    // Most frames replace what they name: only an insertion is parsed here.
    if (typeof data !== "string" || !/hx-swap-oob="(after|before)/.test(data)) return;
    var template = document.createElement("template");
    template.innerHTML = data;
    template.content.querySelectorAll("[hx-swap-oob]").forEach(function (container) {
      if (!INSERTS.test(container.getAttribute("hx-swap-oob") || "")) return;
      Array.prototype.forEach.call(container.children, function (item) {
        if (!item.id) return;
        var shown = document.getElementById(item.id);
        if (shown && shown !== container) shown.remove();
      });
    });
  });
})();
