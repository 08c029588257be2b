"""A stalled rank under torchrun-style data parallelism (gloo, CPU): the other rank fails after the
configured timeout (not torch's half hour) with a message naming the rank that did not answer."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

SCRIPT = r"""
import sys, time, torch
from masklm_kernels.training import distributed
ctx = distributed.setup("cpu", timeout_s=float(sys.argv[1]))
if ctx.rank == 1:
    time.sleep(float(sys.argv[2]))  # the stall: a hung data step
try:
    distributed.global_loss(torch.tensor(1.0), torch.tensor([1, -100]), ctx)
    print("rank", ctx.rank, "finished")
except distributed.StalledRankError as e:
    print("STALLED", e, flush=True)
    sys.exit(7)
except RuntimeError as e:  # the stalled rank, when it wakes up to a group its peer has left
    print("rank", ctx.rank, "error", type(e).__name__, flush=True)
    sys.exit(8)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo on POSIX")
def test_a_stalled_rank_is_named_after_the_timeout():
    pytest.importorskip("torch.distributed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port = _free_port()
    procs = []
    t0 = time.monotonic()
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, "2", "12"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out0, _ = procs[0].communicate(timeout=60)
    elapsed = time.monotonic() - t0
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == 7, out0[-3000:]
    assert "within 2 s" in out0 and "ranks that did not answer: 1" in out0, out0[-3000:]
    assert elapsed < 11, f"rank 0 waited {elapsed:.1f} s for a 2 s timeout"
