"""Suite-wide settings."""

from __future__ import annotations

import os
import tempfile

# A Server made in code keeps its state under $XDG_STATE_HOME/mailgate by default; the
# suite's servers (and the examples it starts) must not write into the real home.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mailgate-tests-state-")
