"""Submit ``nti invert`` as a SLURM job array through submitit (one GPU per task, sharded by task index).

    python scripts/slurm/submitit_launch.py --images /data/images --captions /data/captions.jsonl \
        --output /scratch/nti_out --shards 32 --partition gpu [key=value ...]

``--executor local`` runs the shards as processes on this machine instead (submitit's LocalExecutor) and waits
for them: a try-out on CPU with ``trainer.accelerator=cpu model.spec=tiny``. Needs the ``slurm`` extra.

submitit asks for SIGUSR2 300 s before the time limit (``slurm_signal_delay_s``). While ``nti invert`` runs it
replaces submitit's handler with its own (SIGTERM/SIGUSR1/SIGUSR2 only set a flag): the batch state is saved,
the task requeues itself with ``scontrol requeue <array job>_<task>`` and returns 75; the requeued task runs
the same pickled call, which resumes. ``checkpoint()`` is kept for the case the signal lands outside the run.
"""

from __future__ import annotations

import argparse
import sys


class InvertShard:
    """A picklable callable: ``nti invert`` for one shard; resubmitted as-is on preemption."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __call__(self) -> int:
        from nti_lightning.cli import main

        return main(self.argv)

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(InvertShard(self.argv))  # the rerun resumes from checkpoints/


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options and the key=value overrides passed on to every shard's ``nti invert``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, nargs="+", help="files, folders or lists, as nti invert --images")
    p.add_argument("--captions", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--shards", type=int, default=8, help="array tasks, one GPU each")
    p.add_argument("--partition", default=None)
    p.add_argument("--timeout-min", type=int, default=12 * 60)
    p.add_argument("--logs", default="submitit_logs")
    p.add_argument(
        "--executor",
        choices=("slurm", "local"),
        default="slurm",
        help="slurm (default), or local: the shards run as processes on this machine (submitit's LocalExecutor; "
        "a try-out or a test, with e.g. trainer.accelerator=cpu) and are waited for",
    )
    p.add_argument("--wait", action="store_true", help="wait for every task; exit with the highest exit code")
    return p.parse_known_args(argv)


def shard_calls(args: argparse.Namespace, overrides: list[str]) -> list[InvertShard]:
    """One ``nti invert`` per shard; the overrides come last, so they win over the defaults here."""
    base = ["invert", "--images", *args.images, "--captions", args.captions, "--output", args.output, "--quiet"]
    base += ["trainer.accelerator=gpu", "trainer.devices=1", "output.subdirs=true", *overrides]
    shard = [[f"data.shard_index={k}", f"data.num_shards={args.shards}"] for k in range(args.shards)]
    return [InvertShard([*base, *s]) for s in shard]


def make_executor(args: argparse.Namespace):
    """submitit's executor for ``--executor`` (``AutoExecutor``: the slurm_* parameters only apply to SLURM)."""
    import submitit

    executor = submitit.AutoExecutor(folder=args.logs, cluster=args.executor)
    executor.update_parameters(
        timeout_min=args.timeout_min,
        gpus_per_node=1,
        tasks_per_node=1,
        cpus_per_task=8,
        slurm_partition=args.partition,
        slurm_signal_delay_s=300,
        slurm_array_parallelism=args.shards,
        slurm_additional_parameters={"requeue": True},
    )
    return executor


def submit(argv: list[str] | None = None, executor=None) -> tuple[argparse.Namespace, list]:
    """Submits the shards of ``argv`` (``sys.argv[1:]`` if None) to ``executor`` (default: ``make_executor``)."""
    args, overrides = parse(argv)
    executor = executor or make_executor(args)
    return args, executor.submit_array(shard_calls(args, overrides))


def main(argv: list[str] | None = None) -> int:
    args, jobs = submit(argv)
    print(f"submitted {len(jobs)} tasks: {jobs[0].job_id.split('_')[0]}; watch with: nti status {args.output}")
    if not (args.wait or args.executor == "local"):
        return 0
    codes = [job.result() for job in jobs]  # raises if a task failed outside nti invert
    print(f"exit codes of the tasks: {codes}")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
