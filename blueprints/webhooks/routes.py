"""Routes of the webhooks area. Placeholder until issue 3's webhooks work lands in this area."""

from flask_login import login_required

from blueprints import render
from blueprints.webhooks import bp


@bp.get("/")
@login_required
def index():
    return render("webhooks/index.html")
