"""Run a function on W gloo ranks (CPU processes) and collect what each rank returns.

    results = run_ranks(world, fn, *args)   # fn(rank, world, *args) -> picklable, runs with a process group

`fn` must be a module-level function (it is pickled into the workers). The environment (SSLFAST_BACKEND,
TRITON_INTERPRET, ...) is inherited, so the same test covers the reference path and the interpreted kernels.
"""

import datetime
import os
import pickle
import queue as queue_module
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, fn, args, queue):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    code = 1
    try:
        # Pickled by value: tensors sent through a multiprocessing queue would otherwise be shared-memory
        # handles that die with this process.
        queue.put((rank, pickle.dumps(fn(rank, world, *args))))
        dist.barrier()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        # Leave without tearing gloo down: a rank whose peer already exited can abort in its teardown.
        queue.close()
        queue.join_thread()
        os._exit(code)


def run_ranks(world: int, fn, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            results = dict(queue.get(timeout=timeout) for _ in range(world))
        except queue_module.Empty:
            raise AssertionError(
                f"ranks did not all report within {timeout}s; exit codes "
                f"{[p.exitcode for p in procs]} (tracebacks above)"
            ) from None
        finally:
            for p in procs:
                p.join(timeout)
                if p.is_alive():
                    p.kill()
        assert all(p.exitcode == 0 for p in procs), f"rank exit codes {[p.exitcode for p in procs]}"
    return [pickle.loads(results[r]) for r in range(world)]
