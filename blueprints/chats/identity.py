"""The widget settings page's identity-validation secret (templates/chats/settings.html)."""

from flask_login import current_user

from blueprints.chats import bp
from services.visitor_identity import identity_secret


@bp.app_template_global()
def widget_identity_secret() -> str | None:
    """The admin's tenant's secret for signing visitor identifiers; None for anyone else."""
    if not (current_user.is_authenticated and current_user.is_admin):
        return None
    return identity_secret(current_user.tenant_id)
