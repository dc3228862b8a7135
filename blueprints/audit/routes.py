"""Routes of the audit area. Placeholder until issue 3's audit work lands in this area."""

from flask_login import login_required

from blueprints import render
from blueprints.audit import bp


@bp.get("/")
@login_required
def index():
    return render("audit/index.html")
