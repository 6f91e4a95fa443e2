"""Run every benchmark (benchmarks/bench_*.py) or the ones named: python benchmarks/run.py [inspect resize ...]"""

import glob
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
names = sys.argv[1:]
for path in sorted(glob.glob(os.path.join(here, "bench_*.py"))):
    name = os.path.basename(path)[6:-3]
    if names and name not in names:
        continue
    print(f"\n# {name}", flush=True)
    subprocess.run([sys.executable, path], check=True)
