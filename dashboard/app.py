"""Entry for ``panel serve dashboard/app.py --plugins dashboard.api.routes`` (same app as smartswitch serve)."""

import panel as pn

from dashboard.ui.app import create_app

if pn.state.served:
    create_app().servable(title="smartswitch")
