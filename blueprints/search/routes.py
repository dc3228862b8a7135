from __future__ import annotations

from flask import abort, current_app, request
from flask_login import current_user, login_required

from blueprints import int_arg, keyset_page, render
from blueprints.search import bp
from services import search

# On the overview each kind shows its newest few; "More" opens that kind's own paged list.
OVERVIEW_PER_KIND = 5


@bp.get("/search")
@login_required
def index():
    query = search.clean_query(request.args.get("q"))
    kind = request.args.get("kind", "").strip()
    if kind and kind not in search.KINDS:
        abort(400, description="“kind” must be one of: " + ", ".join(search.KINDS) + ".")
    context = {"q": query, "kind": kind, "kinds": search.KINDS, "next_before": None}
    if not query:
        # A cursor without a query still has to be a valid one (as on every list).
        int_arg("before")
        return render("search/index.html", "search/_results.html", **context)
    if kind:
        model = search.MODELS[kind]
        stmt = search.MATCHERS[kind](current_user.tenant_id, query)
        rows, next_before = keyset_page(stmt, model.id, current_app.config["LIST_PAGE_SIZE"])
        context.update(results={kind: (rows, False)}, next_before=next_before)
    else:
        int_arg("before")
        context["results"] = search.first_matches(current_user.tenant_id, query, OVERVIEW_PER_KIND)
    return render("search/index.html", "search/_results.html", **context)
