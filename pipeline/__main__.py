"""``python -m pipeline`` forwards to the application layer's CLI (:mod:`jobs.cli`).

Kept so the documented command and every MLproject entry point stay as they were; the
library itself never imports the jobs (``runpy`` runs them by name).
"""

import runpy

runpy.run_module("jobs", run_name="__main__", alter_sys=True)
