"""Run a Python command in this process and write its peak memory, however it ends.

    python peak.py OUT.json module safebasin.launcher.cli train job.yaml
    python peak.py OUT.json script path/to/side.py ARGS...

OUT.json: {"exit": code, "cuda_peak_allocated", "cuda_peak_reserved" (bytes, null without
CUDA), "rss_peak" (bytes)}. The same wrapper measures every side of benchmarks/gpu_scale.py, so
their figures count the same things (one-rank safebasin jobs run in their command's process).
"""

import json
import os
import resource
import runpy
import sys

out, kind, target, *rest = sys.argv[1:]
code = 0
try:
    sys.argv = [target, *rest]
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python side.py` has it
        runpy.run_path(target, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
except BaseException:
    code = 1
    raise
finally:
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    with open(out, "w") as f:
        json.dump({"exit": code,
                   "cuda_peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                   "cuda_peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
                   "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
sys.exit(code)
