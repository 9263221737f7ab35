"""Mutation check: break one core mechanism at a time, in a copy of the tree, and run the tests
that claim it. Every mutation must make at least one of its tests fail ("caught").

    python tools/mutation_check.py                  # every mutation, one after the other
    python tools/mutation_check.py eval-label-shift dali-train-rank0   # some of them
    python tools/mutation_check.py --list
    python tools/mutation_check.py --baseline ...   # also run the tests on the unmutated copy

Not part of CI (minutes per mutation: several of the tests train in 2 processes). Results are
recorded in docs/testing.md; rerun after changing a mechanism or the tests that claim it.

How: ``git ls-files -co --exclude-standard`` is copied to a temporary directory (the worktree's
files are never edited), one exact text replacement is applied (it must match exactly once: a
mutation whose site moved fails loudly instead of testing nothing), and ``python -m pytest -x``
runs the named tests inside the copy. The copy is imported in place of the editable install: the
test process and every process it launches run with cwd and PYTHONPATH at the copy (the kernels are
an ordinary sub-package, addernet_dist/kernels/, so the copy shadows all of the editable install).
The script checks where ``addernet_dist`` and ``addernet_dist.kernels`` import from before running
anything.

Why not mutmut: its mutants are random operator swaps over whole files (thousands of runs of
multi-process tests); the point here is a short curated list of semantic breakages, each with the
tests that are supposed to notice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # one line for the docs table
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    # extra environment for the test run (mutated and --baseline): a caller's setting the tests
    # must not depend on
    env: tuple[tuple[str, str], ...] = ()


MUTATIONS = [
    Mutation(
        "save-failure-not-shared",
        "rank 0's checkpoint write failure is not told to the other ranks (a bare barrier)",
        "addernet_dist/engine/base.py",
        "        problem = self.dist.broadcast_object(None if failed is None else str(failed))",
        "        problem = None",
        ("tests/integration/test_save_failure_ranks.py",),
    ),
    Mutation(
        "best-ema-not-restored",
        "a resume does not copy a lost best_ema.pt again from its step's checkpoint",
        "addernet_dist/open_run.py",
        "    if resume_from is not None and ckpt.restore_best(resume_from, ema_step, ckpt.best_ema_path):",
        "    if False:",
        ("tests/integration/test_ema.py::test_a_lost_best_ema_is_copied_again_on_resume",),
    ),
    Mutation(
        "watchdog-starts-at-zero",
        "a resumed run's stall watchdog starts at step 0 (its startup limit ends too early)",
        "addernet_dist/open_run.py",
        "        watchdog.start(first_step=state.global_step)\n",
        "        watchdog.start(first_step=0)\n",
        (
            "tests/integration/test_trainer_open.py::"
            "test_an_injected_logger_gets_the_runs_records_and_the_watchdog_starts_at_the_resumed_step",
        ),
    ),
    Mutation(
        "runtime-change-unreported",
        "a resume under another torch thread count or version does not say so",
        "addernet_dist/open_run.py",
        '        runtime = runtime_changes(client.get("runtime"), runtime_info())',
        "        runtime = {}",
        (
            "tests/integration/test_trainer_open.py::"
            "test_the_runtime_is_saved_logged_and_a_resume_under_another_thread_count_says_so",
        ),
    ),
    Mutation(
        "superseded-best-dropped",
        "resume= an older step leaves the abandoned future's best.pt to be overwritten",
        "addernet_dist/checkpoint/manager.py",
        "        for best in (self.best_path, self.best_ema_path):\n            if best.exists():",
        "        for best in ():\n            if best.exists():",
        (
            "tests/integration/test_best_checkpoint.py::"
            "test_resume_from_an_older_step_keeps_the_abandoned_future_and_its_best",
        ),
    ),
    Mutation(
        "resume-ignores-class-names",
        "a resume onto a tree with other class folders is not refused (labels change meaning)",
        "addernet_dist/trainer.py",
        "        _check_same_classes(client.get(\"class_names\"), getattr(self.train_loader, \"class_names\", None))",
        "        pass",
        ("tests/integration/test_class_names.py",),
    ),
    Mutation(
        "op-forward-sign",
        "reference operator forward at p=1 returns +Σ|X−F| instead of −Σ|X−F|",
        "addernet_dist/ops/reference.py",
        "return dist_mo.neg() if p == 1.0 else",
        "return dist_mo if p == 1.0 else",
        ("tests/unit/test_ops_reference.py::test_matches_float64_formula",),
    ),
    Mutation(
        "op-backward-filter-grad",
        "full-precision filter gradient X−F computed as X+F",
        "addernet_dist/ops/reference.py",
        "return g_mo.t() @ x_mk - w_ok * g_mo.sum(0)[:, None]",
        "return g_mo.t() @ x_mk + w_ok * g_mo.sum(0)[:, None]",
        # (test_filter_gradient_is_full_precision_for_every_p goes through adder_linear, which
        # dispatches to the CPU fast path on this machine: it stays green here)
        ("tests/unit/test_ops_reference.py::test_matches_float64_formula",),
    ),
    Mutation(
        "eq33-zero-norm-local",
        "ZeRO: eq. 33 norms not all-reduced (each rank scales by its shard's norm)",
        "addernet_dist/engine/zero_norms.py",
        "            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self._group)",
        "            pass",
        ("tests/integration/test_deepspeed_engine.py::test_zero_stage_matches_ddp",),
    ),
    Mutation(
        "p-schedule-not-applied",
        "trainer advances p in the log but never sets it on the model",
        "addernet_dist/trainer.py",
        "            self.p = p\n            set_p(self.model, p)",
        "            self.p = p",
        ("tests/integration/test_train_torchrun.py::test_two_process_debug_run",),
    ),
    Mutation(
        "eval-label-shift",
        "evaluate() shifts the labels by one against the logits (labels.roll(1))",
        "addernet_dist/metrics.py",
        "        logits = upcast_logits(logits)\n",
        "        logits = upcast_logits(logits)\n        labels = labels.roll(1)\n",
        (
            "tests/integration/test_eval_distributed.py::test_single_process_evaluate_matches_a_plain_loop",
            "tests/integration/test_eval_distributed.py::test_two_ranks_equal_one_process_on_uneven_split",
        ),
    ),
    Mutation(
        "sampler-rank0-shard",
        "sampler gives every rank rank 0's shard",
        "addernet_dist/data/sampler.py",
        "sl = slice(self.rank, total, w)",
        "sl = slice(0, total, w)",
        (
            "tests/integration/test_data_sharding_decoded.py::"
            "test_each_rank_decodes_the_samplers_order_train_and_val[torchvision]",
        ),
    ),
    Mutation(
        "dali-train-rank0",
        "DALI train feed gives every rank rank 0's files (its own sample indices kept; eval untouched)",
        "addernet_dist/data/dali.py",
        "        for plan in plans:\n"
        "            idx = plan.indices.tolist()\n"
        "            self._pending.append((\n"
        "                [np.frombuffer(os.fsencode(self.samples.paths[i]), dtype=np.uint8) for i in idx],\n",
        "        rank0 = ResumableShardSampler(s.num_samples, batch_size=s.batch_size, rank=0,\n"
        "            world_size=s.world_size, seed=s.seed, shuffle=s.shuffle).plan(epoch).indices.tolist()\n"
        "        for k, plan in enumerate(plans):\n"
        "            idx = plan.indices.tolist()\n"
        "            idx0 = rank0[(start + k) * s.batch_size :][: len(idx)]\n"
        "            self._pending.append((\n"
        "                [np.frombuffer(os.fsencode(self.samples.paths[i]), dtype=np.uint8) for i in idx0],\n",
        (
            "tests/integration/test_data_sharding_decoded.py::"
            "test_each_rank_decodes_the_samplers_order_train_and_val[dali]",
            "tests/integration/test_data_sharding_decoded.py::"
            "test_mid_epoch_resume_decodes_the_rest_of_the_ranks_order[dali]",
        ),
    ),
    Mutation(
        "checkpoint-sha256-unchecked",
        "checkpoint sha256 verification skipped",
        "addernet_dist/runfolder.py",  # the verified format (shared with ds_checkpoint.py)
        "    if hashlib.sha256(body).digest() != digest:",
        "    if False:",
        ("tests/integration/test_resume.py::test_newest_valid_skips_corrupt_files_and_names_them",),
    ),
    Mutation(
        "resume-rng-not-restored",
        "resume does not restore the global RNG states",
        "addernet_dist/trainer.py",
        "            set_rng_state(states[self.dist.rank])",
        "            pass",
        ("tests/integration/test_resume_rng.py",),
    ),
    Mutation(
        "resume-world-size-offset",
        "resume with another world size at an epoch boundary starts one batch into the epoch",
        "addernet_dist/trainer.py",
        "        loader_state = states[self.dist.rank if same_world else 0]\n",
        "        loader_state = states[self.dist.rank if same_world else 0]\n"
        "        if not same_world:\n"
        "            loader_state = {**loader_state, 'world_size': self.dist.world_size, 'batches_done': 1}\n"
        "            loader_state.pop('batch_size')\n",
        ("tests/integration/test_docs_claims.py::test_ddp_resume_with_another_world_size_at_an_epoch_boundary",),
    ),
    Mutation(
        "resume-weights-not-loaded",
        "resume keeps the fresh initial weights (model state not loaded)",
        "addernet_dist/open_run.py",
        "        client = load_for_resume(engine, resume_from)\n",
        "        import torch\n"
        "        fresh = {k: v.clone() for k, v in trainer.model.state_dict().items() if torch.is_tensor(v)}\n"
        "        client = load_for_resume(engine, resume_from)\n"
        "        trainer.model.load_state_dict(fresh, strict=False)\n",
        ("tests/integration/test_docs_claims.py::test_ddp_resume_with_another_world_size_at_an_epoch_boundary",),
    ),
    Mutation(
        "resume-optimizer-not-restored",
        "resume does not restore the optimizer state (momentum buffers)",
        "addernet_dist/engine/ddp.py",
        '        self.optimizer.load_state_dict(state["optimizer"])',
        "        pass",
        ("tests/integration/test_resume_rng.py",),
    ),
    Mutation(
        "resume-loader-position-lost",
        "loader resume restarts the epoch at batch 0",
        "addernet_dist/data/sampler.py",
        "        self.batches_done = batches_done\n",
        "        self.batches_done = 0\n",
        (
            "tests/integration/test_data_sharding_decoded.py::"
            "test_mid_epoch_resume_decodes_the_rest_of_the_ranks_order[torchvision]",
        ),
    ),
    Mutation(
        "bn-recalibration-skipped",
        "trainer skips BN recalibration but still logs that it ran",
        "addernet_dist/evaluator.py",
        "            recal = self.recalibrate(model, self.dist, epoch, self.autocast_dtype)",
        "            recal = self.recalibrate.num_batches",
        (
            "tests/integration/test_bn_recalibration.py::"
            "test_trainer_recalibrates_before_mid_decay_evaluations_and_saves_what_it_evaluated",
        ),
    ),
    Mutation(
        "bf16-eval-adder-rounded",
        "under bf16 autocast, inference rounds every pre-BN adder output to bf16",
        "addernet_dist/ops/__init__.py",
        "    with amp.autocast_off(x.device.type):\n"
        "        return impl(x, w, stride, padding, dilation, p, grad_x, grad_w)\n",
        "    rnd = torch.is_autocast_enabled(x.device.type) and not torch.is_grad_enabled()\n"
        "    with amp.autocast_off(x.device.type):\n"
        "        y = impl(x, w, stride, padding, dilation, p, grad_x, grad_w)\n"
        "    return y.to(torch.bfloat16).float() if rnd else y\n",
        (
            "tests/integration/test_deepspeed_engine.py::"
            "test_bf16_precision_trains_close_to_fp32_and_converts_to_fp32_masters",
        ),
    ),
    Mutation(
        "eval-ignores-autocast",
        "evaluate() runs the model without the engine's autocast dtype",
        "addernet_dist/metrics.py",
        "        with autocast(dist.device.type, autocast_dtype):\n            logits = model(images)\n",
        "        with autocast(dist.device.type, None):\n            logits = model(images)\n",
        (
            "tests/integration/test_deepspeed_engine.py::"
            "test_bf16_precision_trains_close_to_fp32_and_converts_to_fp32_masters",
        ),
    ),
    Mutation(
        "fused-negated-bn-shift",
        "fused inference epilogue adds −β instead of β (BN shift negated)",
        "addernet_dist/models/fusion.py",
        "            shift=beta.float(),",
        "            shift=-beta.float(),",
        (
            "tests/unit/test_triton_fused.py::test_fuse_resnet8_block_pairs",
            "tests/unit/test_triton_fused.py::test_fuse_sequential_with_relu_lenet",
        ),
    ),
    Mutation(
        "fused-residual-dropped",
        "fused inference epilogue drops the residual add",
        "addernet_dist/models/fusion.py",
        "            residual=residual,\n            relu=self.relu,",
        "            residual=None,\n            relu=self.relu,",
        ("tests/unit/test_triton_fused.py::test_fuse_resnet8_block_pairs",),
    ),
    Mutation(
        "retention-ignores-validity",
        "retention keeps the newest keep_last step numbers, readable or not",
        "addernet_dist/checkpoint/manager.py",
        "            problem = self._check(path)\n            if problem is not None:\n"
        "                self.move_aside(path, problem)",
        "            problem = None\n            if problem is not None:\n"
        "                self.move_aside(path, problem)",
        (
            "tests/integration/test_runfolder.py::"
            "test_prune_deletes_only_verified_files_older_than_keep_last_valid_ones",
        ),
    ),
    Mutation(
        "run-lock-not-taken",
        "the run-folder lock is never taken (two runs share a folder)",
        "addernet_dist/runfolder.py",
        "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "            pass",
        ("tests/integration/test_runfolder.py::test_run_lock_is_exclusive_and_released",),
    ),
    Mutation(
        "divergence-unchecked",
        "the non-finite guard never stops the run",
        "addernet_dist/guard.py",
        "        if streak < self.limit and n_bad == 0:",
        "        if True:",
        (
            "tests/integration/test_runfolder.py::test_divergence_stops_the_run_without_saving_a_nonfinite_model",
        ),
    ),
    Mutation(
        "eval-bn-buffers-not-broadcast",
        "an evaluation without BN recalibration skips the broadcast of rank 0's BN buffers",
        "addernet_dist/evaluator.py",
        "            self.dist.broadcast_buffers_(model)",
        "            pass",
        (
            "tests/integration/test_rank_agreement.py::"
            "test_evaluation_without_recalibration_uses_rank0_bn_buffers_everywhere",
        ),
    ),
    Mutation(
        "guard-allreduce-min",
        "the non-finite guard all-reduces its streak and bad-tensor count with MIN instead of MAX",
        "addernet_dist/guard.py",
        "tdist.all_reduce(t, op=tdist.ReduceOp.MAX)",
        "tdist.all_reduce(t, op=tdist.ReduceOp.MIN)",
        (
            "tests/integration/test_rank_agreement.py::test_one_ranks_nonfinite_loss_stops_every_rank",
            "tests/integration/test_rank_agreement.py::test_one_ranks_nonfinite_bn_buffer_stops_every_rank",
        ),
    ),
    Mutation(
        "guard-params-only",
        "the non-finite model check looks at the parameters only, not the buffers",
        "addernet_dist/guard.py",
        "        ts = [t.detach() for t in model.parameters()] + [\n"
        "            b for b in model.buffers() if b.is_floating_point()\n"
        "        ]\n",
        "        ts = [t.detach() for t in model.parameters()]\n",
        (
            "tests/integration/test_saved_models.py::test_a_nan_bn_running_var_is_never_saved",
            "tests/integration/test_rank_agreement.py::test_one_ranks_nonfinite_bn_buffer_stops_every_rank",
        ),
    ),
    Mutation(
        "export-std-imagenet",
        "the export metadata's std is ImageNet's instead of the run's data.std",
        "addernet_dist/interop.py",
        '"std": json.dumps(list(data_cfg.get("std", IMAGENET_STD))),',
        '"std": json.dumps(list(IMAGENET_STD)),',
        ("tests/integration/test_interop.py::test_export_carries_the_runs_normalisation",),
    ),
    Mutation(
        "best-top1-latest",
        "the recorded best top-1 is the latest candidate's, not the maximum",
        "addernet_dist/evaluator.py",
        "if not self.best_candidate(p) or not result.top1 > state.best_top1:",
        "if not self.best_candidate(p):",
        ("tests/integration/test_saved_models.py::test_best_pt_is_the_maximum_of_the_final_p_evaluations",),
    ),
    Mutation(
        "augment-rng-ignores-epoch",
        "the per-sample augmentation RNG is seeded without the epoch (same crops every epoch)",
        "addernet_dist/data/folder.py",
        "return random.Random((seed << 80) ^ (epoch << 40) ^ position)",
        "return random.Random((seed << 80) ^ position)",
        (
            "tests/unit/test_data_folder.py::"
            "test_augmentation_draws_change_with_the_epoch_at_a_fixed_position",
        ),
    ),
    Mutation(
        "deepspeed-sh-cpu-nproc-unchecked",
        "launch/deepspeed.sh no longer demands NPROC for a CPU run (tests run with the caller's "
        "DS_ACCELERATOR=cpu set)",
        "launch/deepspeed.sh",
        'elif [[ "${DS_ACCELERATOR:-}" == cpu ]]; then',
        "elif false; then",
        ("tests/integration/test_docs_claims.py::test_deepspeed_sh_passes_the_hostfile_and_its_first_host",),
        env=(("DS_ACCELERATOR", "cpu"),),
    ),
    Mutation(
        "zero0-norm-other-reduction",
        "DeepSpeed eq. 33 norms by square().sum() instead of the DDP engine's reduction (issue 21.8)",
        "addernet_dist/engine/zero_norms.py",
        "            piece_sq = grad_norms([v for _, v in pieces]).float().square()",
        "            piece_sq = torch.stack([v.float().square().sum() for _, v in pieces])",
        (
            "tests/integration/test_deepspeed_config.py::test_pre_hook_matches_ddp_engine_processing",
            "tests/integration/test_engine_bf16_agreement.py",
        ),
    ),
    Mutation(
        "imagenet-config-channels-last",
        "configs/imagenet_resnet50.yaml trains channels_last again (issue 21.3)",
        "configs/imagenet_resnet50.yaml",
        "  channels_last: false",
        "  channels_last: true",
        ("tests/integration/test_config.py::test_adder_configs_keep_nchw_for_the_adder_kernels",),
    ),
    Mutation(
        "dali-eval-pipeline-rebuilt",
        "DALI builds the eval pipeline at every evaluation again (issue 21.6)",
        "addernet_dist/data/dali.py",
        "        reused = cached is not None and cached[0] == key",
        "        reused = False",
        ("tests/integration/test_dali_loader.py::test_eval_pipeline_is_built_once_and_reads_the_same_pixels",),
    ),
    Mutation(
        "dali-train-pipeline-rebuilt",
        "DALI builds the train pipeline every epoch again (issue 21.6)",
        "addernet_dist/data/dali.py",
        "        if resume is None and self._train_pipe is not None and self._train_pos == (epoch, start):",
        "        if False:",
        (
            "tests/integration/test_dali_loader.py::"
            "test_train_pipeline_is_built_once_per_run_and_resumes_at_epoch_boundaries",
        ),
    ),
    Mutation(
        "dali-decoder-padding-dropped",
        "the mixed decoder gets no nvJPEG device memory padding (issue 21.6)",
        "addernet_dist/data/dali.py",
        '        "device_memory_padding": d.device_memory_padding,',
        "",
        ("tests/integration/test_dali_loader.py::test_mixed_pipeline_is_defined_and_placed_on_cpu",),
    ),
    Mutation(
        "tuning-not-a-phase-for-peers",
        "a rank waiting for rank 0's tile choice ignores rank 0's tuning progress (issue 21)",
        "addernet_dist/guard.py",
        'if self.phase == "tuning" and _peer_tuned(first, now, self.dist.rank):',
        "if False:",
        (
            "tests/integration/test_tile_phase.py::"
            "test_tuning_longer_than_the_limits_is_not_a_stall_and_a_failure_reaches_every_rank",
        ),
    ),
    Mutation(
        "tuning-error-not-broadcast",
        "rank 0 raises a tuning failure before the broadcast (the others wait for a tile)",
        "addernet_dist/kernels/tile_tuner.py",
        "            except Exception as e:\n                error = e\n",
        "            except Exception:\n                raise\n",
        (
            "tests/integration/test_tile_phase.py::"
            "test_tuning_longer_than_the_limits_is_not_a_stall_and_a_failure_reaches_every_rank",
        ),
    ),
    Mutation(
        "tiles-not-restored",
        "a resumed run ignores the checkpoint's tile choices (re-tunes, may pick other tiles)",
        "addernet_dist/tiles.py",
        'n = tt.restore_choices(entries, source="checkpoint \'tiles\'")',
        "n = 0",
        (
            "tests/integration/test_tile_phase.py::"
            "test_run_tunes_all_p_paths_at_start_and_resume_reuses_the_checkpoints_tiles",
        ),
    ),
    Mutation(
        "ds-bf16-buffers-unchecked",
        "DeepSpeed bf16: BN buffers cast to bf16 by DeepSpeed go unnoticed",
        "addernet_dist/engine/deepspeed.py",
        "            check_buffers_fp32(model, deepspeed.__version__)",
        "            pass",
        ("tests/integration/test_deepspeed_bf16_cast.py::test_deepspeed_bf16_must_keep_bn_buffers_fp32",),
    ),
]


def _copy_tree(dst: Path) -> None:
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file():
            continue  # deleted but not yet committed
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)


def _env(root: Path, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    e = dict(os.environ)
    e.update(extra)
    e["PYTHONPATH"] = str(root) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONDONTWRITEBYTECODE"] = "1"
    return e


def _check_imports(root: Path) -> None:
    code = (
        "import addernet_dist, addernet_dist.kernels as k;"
        "print(addernet_dist.__file__); print(k.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=_env(root), capture_output=True, text=True
    )
    paths = out.stdout.split()
    if out.returncode or len(paths) != 2 or not all(p.startswith(str(root)) for p in paths):
        raise SystemExit(f"the copy is not what gets imported: {out.stdout}{out.stderr}")


def _pytest(
    root: Path, tests: tuple[str, ...], timeout: int, extra_env: tuple[tuple[str, str], ...] = ()
) -> tuple[bool, str, float]:
    """(passed, first failing test id or '', seconds)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests],
            cwd=root,
            env=_env(root, extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, "TIMEOUT", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    lines = proc.stdout.splitlines()
    failed = [ln.split()[1] for ln in lines if ln.startswith("FAILED ")]
    errors = [ln.split()[1] for ln in lines if ln.startswith("ERROR ")]
    if proc.returncode not in (0, 1):  # usage or collection error: not a verdict
        raise SystemExit(f"pytest rc={proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    if proc.returncode == 1 and not failed:
        # a fixture error (e.g. a worker that timed out on a loaded machine) is not a verdict
        return (
            False,
            "ERROR (inconclusive): " + (errors[0] if errors else (lines[-1] if lines else "")),
            dt,
        )
    return proc.returncode == 0, (failed[0] if failed else ""), dt


def run(mutations: list[Mutation], baseline: bool, timeout: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = Path(tmp) / "tree"
        _copy_tree(root)
        _check_imports(root)
        for m in mutations:  # every site first: a stale one fails before an hour of runs
            count = (root / m.path).read_text().count(m.old)
            if count != 1:
                raise SystemExit(f"{m.name}: the site occurs {count} times in {m.path}; update it")
        for m in mutations:
            target = root / m.path
            original = target.read_text()
            if baseline:
                ok, first, dt = _pytest(root, m.tests, timeout, m.env)
                if not ok:
                    raise SystemExit(f"{m.name}: tests fail WITHOUT the mutation ({first})")
            target.write_text(original.replace(m.old, m.new))
            try:
                ok, first, dt = _pytest(root, m.tests, timeout, m.env)
            finally:
                target.write_text(original)
            caught = not ok and not first.startswith("ERROR")
            rows.append({"name": m.name, "caught": caught, "by": first, "seconds": round(dt)})
            print(
                f"{'CAUGHT' if caught else 'MISSED'}  {m.name:32s} {dt:6.0f}s  {first}", flush=True
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and their tests")
    ap.add_argument("--baseline", action="store_true", help="first run each test set unmutated")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutation(s) {unknown}; valid: {sorted(by_name)}")
    chosen = [by_name[n] for n in args.names] or MUTATIONS
    if args.list:
        for m in chosen:
            env = "".join(f"\n  with {k}={v}" for k, v in m.env)
            print(f"{m.name}: {m.what}\n  " + "\n  ".join(m.tests) + env)
        return 0
    rows = run(chosen, args.baseline, args.timeout)
    missed = [r["name"] for r in rows if not r["caught"]]
    print(
        f"{len(rows) - len(missed)}/{len(rows)} caught" + (f"; MISSED: {missed}" if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
