"""Entry for ``panel serve dashboard/app.py --plugins dashboard.api.routes`` (same app as smartswitch serve)."""

import panel as pn

from dashboard.config import ConfigError
from dashboard.errors import SmartswitchError

if pn.state.served:
    from dashboard.server import from_environment

    try:
        app = from_environment()
    except (ConfigError, SmartswitchError) as exc:  # data dir in use, database unusable, bad catalog
        pn.pane.Alert(f"**smartswitch cannot start.** {exc}", alert_type="danger").servable(title="smartswitch")
    else:
        app.dashboard().servable(title="smartswitch")
