"""Routes of the metrics area. Placeholder until issue 3's metrics work lands in this area."""

from flask_login import login_required

from blueprints import render
from blueprints.metrics import bp


@bp.get("/")
@login_required
def index():
    return render("metrics/index.html")
