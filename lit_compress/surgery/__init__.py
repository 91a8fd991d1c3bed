"""Pure-torch structural surgery: no Lightning import here (a test checks it).

Leaf functions return a new module; model-wide functions end in ``_``, edit in place and return
the plain-data log records they applied. Importing this package registers every built-in
replayer (see :mod:`lit_compress.surgery.replay`).
"""

from lit_compress.surgery.log import LOG_KEY, LOG_VERSION, make_record, strip_measurements, to_plain
from lit_compress.surgery.modules import (
    SurgeryTransaction,
    get_submodule,
    module_device_dtype,
    preserve_mode,
    replace_submodule,
    set_parameter,
)
from lit_compress.surgery.replay import (
    applied_events,
    record_events,
    register_replay,
    registered_ops,
    replay_events_,
)
from lit_compress.surgery.select import close_names, name_matches, select_modules

__all__ = [
    "LOG_KEY",
    "LOG_VERSION",
    "SurgeryTransaction",
    "applied_events",
    "close_names",
    "get_submodule",
    "make_record",
    "module_device_dtype",
    "name_matches",
    "preserve_mode",
    "record_events",
    "register_replay",
    "registered_ops",
    "replace_submodule",
    "replay_events_",
    "select_modules",
    "set_parameter",
    "strip_measurements",
    "to_plain",
]
