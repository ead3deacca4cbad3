"""TVM's CPU thread pool takes every physical core (lbdlc.bundle_runtime.use_all_cores).

Left to itself TVM 0.27 starts half the logical CPUs on x86, assuming two hyper-threads per
core: on a 2-vCPU machine without hyper-threading it ran every model on one core while ONNX
Runtime used both."""
import os
import subprocess
import sys

from lbdlc.bundle_runtime import physical_cores

HYPER_THREADED = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\nsiblings\t: 4\ncpu cores\t: 2" for cpu in range(4))
TWO_CORES = "\n\n".join(f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu}\ncpu cores\t: 2" for cpu in range(2))
TWO_SOCKETS = "\n\n".join(f"processor\t: {cpu}\nphysical id\t: {cpu // 2}\ncore id\t\t: {cpu % 2}" for cpu in range(4))


def test_physical_cores_counts_cores_not_hyper_threads():
    assert physical_cores(HYPER_THREADED, {0, 1, 2, 3}) == 2
    assert physical_cores(TWO_CORES, {0, 1}) == 2
    assert physical_cores(TWO_SOCKETS, {0, 1, 2, 3}) == 4  # core ids repeat across packages


def test_physical_cores_counts_only_the_cpus_this_process_may_use():
    assert physical_cores(TWO_SOCKETS, {0, 1}) == 2
    assert physical_cores(HYPER_THREADED, {0, 2}) == 1  # two threads of one core
    assert physical_cores("", {0, 1, 2}) == 3  # no /proc/cpuinfo details: the logical CPUs


def _tvm_threads(env: dict) -> int:
    code = ("from lbdlc.bundle_runtime import use_all_cores; use_all_cores(); import tvm_ffi, tvm; "
            "print(tvm_ffi.get_global_func('runtime.NumThreads')())")
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_tvm_runs_on_every_physical_core_unless_told_otherwise():
    assert _tvm_threads({}) == physical_cores()
    assert _tvm_threads({"TVM_NUM_THREADS": "1"}) == 1
