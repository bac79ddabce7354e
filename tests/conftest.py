"""Suite-wide settings. ``amp: auto`` measures bf16 against float32 once per machine and caches the
result under ~/.cache/larvseg (larvseg.precision); the suite must neither spend that time nor write
there, so auto is float32 here, in this process and in every child it starts (they inherit the
environment). tests/test_precision_threads.py tests the measurement itself, in temporary folders."""

import os

os.environ["LARVSEG_AMP_CALIBRATION"] = "off"
