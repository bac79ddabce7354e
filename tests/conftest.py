"""Suite-wide settings, inherited by every child process the tests start (they copy the environment).

- ``amp: auto`` measures bf16 against float32 once per machine and caches the result (larvseg.precision):
  the suite must not spend that time, so auto is float32 here. tests/test_precision_threads.py tests the
  measurement itself, in temporary folders.
- Per-machine caches (amp calibrations, ImageNet file indexes: larvseg.cache_dir) go to a temporary
  folder for the session, never to the user's ~/.cache/larvseg.
"""

import os
import tempfile

os.environ["LARVSEG_AMP_CALIBRATION"] = "off"
_CACHE = tempfile.TemporaryDirectory(prefix="larvseg-test-cache-")  # removed when the session ends
os.environ["XDG_CACHE_HOME"] = _CACHE.name
