"""A checkpoint that rank 0 cannot write stops every rank at once, each saying why (issue 20.2):
with a bare barrier after rank 0's write, rank 1 waited for the stall watchdog or the 30-minute
process-group timeout while rank 0 had already exited with "disk full"."""

from __future__ import annotations

import errno
import sys
import time

import pytest

from tests.train_helpers import DEBUG_CONFIG, FAST, start_workers

RUN = [
    "data.synthetic_train_size=64",
    "data.synthetic_val_size=16",
    "train.global_batch_size=16",
    "train.epochs=1",
    "train.ckpt_every_steps=2",
    "train.precision=fp32",
    "train.stall_timeout_s=600",  # the watchdog must not be what ends rank 1
    "wandb.enabled=false",
]


def _worker(out: str) -> int:
    import os

    from addernet_dist import runfolder, train

    if os.environ["RANK"] == "0":
        real = runfolder.atomic_write_bytes

        def full(data, path, *a, **kw):
            if str(path).endswith("step_000000002.pt"):
                raise runfolder.no_room_error(path, len(data), OSError(errno.ENOSPC, "No space left on device"))
            return real(data, path, *a, **kw)

        runfolder.atomic_write_bytes = full
    return train.main(["--config", str(DEBUG_CONFIG), *FAST, *RUN, f"output_dir={out}"])


@pytest.mark.timeout(240)
def test_rank0_write_failure_stops_every_rank_naming_the_file(tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    procs = start_workers(["-m", __name__, str(out)], 2)
    results = [p.communicate(timeout=200) for p in procs]
    elapsed = time.monotonic() - t0
    codes = [p.returncode for p in procs]
    errs = [e for _, e in results]
    assert codes == [2, 2], errs
    step2 = out / "checkpoints" / "step_000000002.pt"
    assert "error: " in errs[0] and str(step2) in errs[0] and "No space left on device" in errs[0], errs[0][-2000:]
    assert f"error: rank 0 could not write {step2}" in errs[1], errs[1][-2000:]
    assert "Traceback" not in errs[1]
    assert not step2.exists()
    assert elapsed < 200  # not the watchdog's 600 s, nor the process group's 30 minutes


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
