"""`lbdlc build --tune N`: MetaSchedule tuning of a target's TVM library, with its database
kept next to the build and reused while the graph is unchanged.

TVM 0.27's CPU code is naive until scheduled (DESIGN.md); MetaSchedule searches schedules for
each fused TIR function of the Relax module (a *task*), measures them on this machine, and
records the best in a JSON database. Tuning needs static shapes, so a tuned library fixes
every symbolic dimension (batch 1 unless --static says otherwise).

The database lives in <build>/tuning/<target>-<key>/, where the key hashes the fused Relax
module (TVMScript text), the TVM target and the TVM version: any change of graph, shapes,
precision or target gives a new key. A build reads the previous build's tuning/ directory
(the output directory being replaced), so rebuilding an unchanged spec applies the recorded
schedules without tuning again; a larger --tune N than recorded tunes again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SpecError

TUNING_DIR = "tuning"
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass
class Tuned:
    key: str
    directory: str  # relative to the build directory
    trials: int  # the budget the database was tuned with
    tasks: int
    reused: bool
    seconds: float  # tuning time in this build (0 when reused)

    def to_json(self) -> dict:
        return {"key": self.key, "database": self.directory, "trials": self.trials, "tasks": self.tasks, "reused": self.reused}


@contextmanager
def fast_inspect_stack():
    """`inspect.stack()` without its per-frame `getmodule` scan of sys.modules.

    Importing tvm.s_tir.tensor_intrin parses a few hundred TVMScript functions, and each calls
    inspect.stack(), whose getframeinfo() looks up the module of every frame without a source
    file (the import machinery's frozen frames) by scanning all of sys.modules: with torch
    loaded (~2,000 modules) that import took 250 s on this 2-core machine, 14 s with this
    stack (the same frames, code context read with linecache)."""
    import inspect
    import linecache
    import sys

    original = inspect.stack

    def stack(context: int = 1):
        frame, infos = sys._getframe(1), []
        while frame is not None:
            filename = frame.f_code.co_filename
            line = "" if filename.startswith("<") else linecache.getline(filename, frame.f_lineno)
            infos.append(inspect.FrameInfo(frame, filename, frame.f_lineno, frame.f_code.co_name, [line] if line else None, 0 if line else None))
            frame = frame.f_back
        return infos

    inspect.stack = stack
    try:
        yield
    finally:
        inspect.stack = original


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def require_meta_schedule() -> None:
    """The tuner's Python dependencies (apache-tvm's `meta-schedule` extra and its pool)."""
    missing = []
    for module, package in (("xgboost", "xgboost"), ("psutil", "psutil"), ("cloudpickle", "cloudpickle")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise SpecError(f"--tune needs {', '.join(missing)} (TVM's MetaSchedule tuner), which is not installed",
                        hint="pip install 'lbdlc[tune]' (or: pip install 'apache-tvm[meta-schedule]' psutil cloudpickle)")


def module_key(mod, target) -> str:
    import tvm

    text = mod.script(show_meta=True)
    payload = json.dumps({"module": text, "target": str(target), "tvm": tvm.__version__}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _reusable(directory: Path, trials: int) -> dict | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file() or not all((directory / f).is_file() for f in DATABASE_FILES):
        return None
    meta = json.loads(meta_path.read_text())
    return meta if meta.get("trials", 0) >= trials else None


def carry_over(previous: Path | None, build: Path) -> None:
    """Keep the previous build's tuning databases in the new build (any target, any key)."""
    if previous is None or not (previous / TUNING_DIR).is_dir():
        return
    for entry in sorted((previous / TUNING_DIR).iterdir()):
        if entry.is_dir() and not (build / TUNING_DIR / entry.name).exists():
            shutil.copytree(entry, build / TUNING_DIR / entry.name)


def tune(mod, target, target_name: str, trials: int, build: Path, log=None) -> tuple[object, Tuned]:
    """`mod` after the zero pipeline (fused TIR functions), static shapes. Returns the module with
    the database's schedules applied, and what was done. `build` is the new build directory,
    which already holds the previous build's databases (carry_over)."""
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm import relax

    require_meta_schedule()
    from .bundle_runtime import use_all_cores

    use_all_cores()  # candidates are measured on as many cores as the deployed library runs on
    with fast_inspect_stack():  # TVMScript-parses every tensor intrinsic; MetaSchedule imports it
        import tvm.s_tir.tensor_intrin
    key = module_key(mod, target)
    rel = f"{TUNING_DIR}/{target_name}-{key}"
    directory = build / rel
    tasks = tunable_tasks(ms.relax_integration.extract_tasks(mod, target))
    meta = _reusable(directory, trials)
    seconds = 0.0
    if meta is None:
        if not tasks:
            raise SpecError(f"--tune: nothing to tune for target '{target_name}' (no function of the model does arithmetic)")
        work = Path(tempfile.mkdtemp(prefix="lbdlc-tune-"))
        try:
            start = time.perf_counter()
            per_task = max(1, -(-trials // len(tasks)))
            (log or _stderr)(f"tuning {len(tasks)} tasks for target {target_name}: {trials} MetaSchedule trials "
                             f"(up to {per_task} a task) ...")
            # A lighter evolutionary search than the default (population 512, 4 generations): with
            # a budget of tens of trials per task, the default spent most of the time searching.
            strategy = ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=32, genetic_num_iters=2)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(work), strategy=strategy, seed=0)
            database = ms.database.JSONDatabase(work_dir=str(work))
            runner = ms.runner.LocalRunner()
            seeded = seed_default_schedules(tasks, target, database, runner)
            (log or _stderr)(f"lbdlc's default schedules measured as the first candidates of {seeded} tasks")
            import logging

            console = logging.getLogger("tvm.s_tir.meta_schedule")
            level = console.level
            console.setLevel(logging.WARNING)  # its console handler takes this level; the per-task logs stay in `work`
            try:
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(work), max_trials_global=trials,
                    max_trials_per_task=per_task, num_trials_per_iter=max(4, -(-per_task // 2)), builder=in_process_builder(),
                    runner=runner, database=database,
                )
            finally:
                console.setLevel(level)
            seconds = time.perf_counter() - start
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            for f in DATABASE_FILES:
                shutil.copyfile(work / f, directory / f)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        meta = {"key": key, "target": str(target), "trials": trials, "tasks": [t.task_name for t in tasks],
                "tvm": tvm.__version__, "seconds": round(seconds, 1)}
        (directory / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        reused = False
    else:
        reused = True
    database = ms.database.JSONDatabase(work_dir=str(directory), allow_missing=False)
    with target, database:
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    return mod, Tuned(key, rel, int(meta["trials"]), len(tasks), reused, seconds)


def seed_default_schedules(tasks: list, target, database, runner) -> int:
    """Each task's lbdlc default schedule (backends/tvm_schedule.py), built and measured by the
    tuner's own runner and committed to the database as a tuning record. MetaSchedule applies
    the fastest record of each task, so a tuned library is never slower than the untuned one
    on any kernel (up to measurement noise), and its search starts from these schedules
    (the evolutionary search seeds its population from the database). Returns the number of
    tasks seeded."""
    import tvm.s_tir.meta_schedule as ms

    from .backends.tvm_schedule import default_schedule

    candidates = []
    for task in tasks:
        workload_mod = task.dispatched[0]
        sch = default_schedule(workload_mod["main"], target)
        if sch is not None and len(sch.trace.insts):
            candidates.append((workload_mod, sch))
    if not candidates:
        return 0
    builds = in_process_builder().build([ms.builder.BuilderInput(sch.mod, target) for _, sch in candidates])
    inputs, kept = [], []
    for (workload_mod, sch), built in zip(candidates, builds):
        if built.error_msg is None:
            inputs.append(ms.runner.RunnerInput(built.artifact_path, "cpu" if target.kind.name == "llvm" else target.kind.name,
                                                ms.arg_info.ArgInfo.from_prim_func(workload_mod["main"])))
            kept.append((workload_mod, sch))
    seeded = 0
    for (workload_mod, sch), future in zip(kept, runner.run(inputs)):
        result = future.result()
        if result.error_msg is None:
            workload = database.commit_workload(workload_mod)
            database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, workload, [float(t) for t in result.run_secs], target,
                ms.arg_info.ArgInfo.from_prim_func(workload_mod["main"])))
            seeded += 1
    return seeded


def tunable_tasks(tasks: list) -> list:
    """Tasks with arithmetic to schedule: pure data movement (reshape, transpose: one FLOP by
    TVM's estimate) has a design space of one, on which the search only spins."""
    from tvm.s_tir.analysis import estimate_tir_flops

    return [t for t in tasks if not t.mod.attrs.get("tirx.is_scheduled", False) and estimate_tir_flops(t.dispatched[0]) > 1]


def in_process_builder():
    """A MetaSchedule builder that compiles candidates in this process. TVM's LocalBuilder
    starts a fresh pool of worker processes for every batch of candidates (each one importing
    TVM, ~10 s on a loaded 2-core machine), which dominated tuning time here; compiling a
    candidate takes milliseconds. Candidates still run in the LocalRunner's worker process."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import (
        default_build,
        default_export,
    )

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(item.mod, item.target, None)), None))
                except Exception as exc:  # noqa: BLE001 - an invalid candidate: reported, skipped
                    results.append(BuilderResult(None, f"InProcessBuilder: {exc}"))
            return results

    return InProcessBuilder()
