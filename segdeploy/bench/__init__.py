"""`segdeploy bench`: segdeploy's inference against the pipelines users would pick instead.

    from segdeploy.bench import run_bench, BenchSettings, from_dataset, from_folders

Torch-free to import: torch and transformers are loaded only inside the worker
processes of the backends that need them (see backends.py, worker.py).
"""

# Runner classes register themselves on import: every module that holds some is imported
# here, so that any process importing segdeploy.bench (the workers too) sees them all.
from segdeploy.bench import openvino  # noqa: F401
from segdeploy.bench.backends import Backend, check_backend, default_backends, parse_backend
from segdeploy.bench.inputs import BenchInputs, from_dataset, from_folders
from segdeploy.bench.run import TARGETS, BenchSettings, judge_targets, run_bench

__all__ = [
    "TARGETS",
    "Backend",
    "BenchInputs",
    "BenchSettings",
    "check_backend",
    "default_backends",
    "from_dataset",
    "from_folders",
    "judge_targets",
    "parse_backend",
    "run_bench",
]
