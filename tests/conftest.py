import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Tests import the harness and the HF zoo as top-level modules (spawned ranks re-import them too).
sys.path.insert(0, str(Path(__file__).parent))

# torchrun, inductor and dist_checkpointing write under the temp dir: keep it inside the test run.
_tmp = Path(tempfile.gettempdir()) / f"minillm-tests-{os.getpid()}"
_tmp.mkdir(parents=True, exist_ok=True)
os.environ["TMPDIR"] = str(_tmp)
tempfile.tempdir = str(_tmp)
atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
