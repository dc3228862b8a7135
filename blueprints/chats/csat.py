"""The CSAT report's place on the Metrics page (templates/metrics/_csat.html asks for it)."""

from flask_login import current_user

from blueprints.chats import bp
from services.csat import csat_report


@bp.app_template_global("csat_report")
def csat_report_for_page(start, end):
    """The signed-in user's tenant's report for the page's range; None when signed out."""
    if not current_user.is_authenticated:
        return None
    return csat_report(current_user.tenant_id, start, end)
