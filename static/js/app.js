// Console behaviour shared by every page (loaded once from base.html; no inline scripts).
//
// Fragments pushed over the live socket are rendered by workers, which have no visitor
// session and so leave the CSRF field of their forms empty. Before such a form is sent,
// fill it with this page's token (the one htmx already sends as a header).
(function () {
  "use strict";
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
})();
