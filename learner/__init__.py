"""The learner: driver loop, Flow-GRPO math, DeepSpeed engine.

Importing it quiets the ML libraries' chatter in this process and the processes it
starts (``learner.console.QUIET_ENV``: transformers' import-time advisories, diffusers'
loading bars), unless ``SOLACE_VERBOSE=1`` (``python -m learner.main --verbose`` sets it
for the actors; the driver's own imports come before any flag is read).
"""

import os as _os

from learner.console import QUIET_ENV as _QUIET_ENV

if _os.environ.get("SOLACE_VERBOSE", "0") in ("", "0"):
    for _key, _value in _QUIET_ENV.items():
        _os.environ.setdefault(_key, _value)
