"""Submit ``nti invert`` as a SLURM job array through submitit (one GPU per task, sharded by task index).

    python scripts/slurm/submitit_launch.py --images /data/images --captions /data/captions.jsonl \
        --output /scratch/nti_out --shards 32 --partition gpu [key=value ...]

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--captions", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--shards", type=int, default=8, help="array tasks, one GPU each")
    p.add_argument("--partition", default=None)
    p.add_argument("--timeout-min", type=int, default=12 * 60)
    p.add_argument("--logs", default="submitit_logs")
    args, overrides = p.parse_known_args()

    import submitit

    executor = submitit.AutoExecutor(folder=args.logs)
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
    base = ["invert", "--images", args.images, "--captions", args.captions, "--output", args.output, "--quiet"]
    base += ["trainer.accelerator=gpu", "trainer.devices=1", "output.subdirs=true", *overrides]
    shard = [[f"data.shard_index={k}", f"data.num_shards={args.shards}"] for k in range(args.shards)]
    calls = [InvertShard([*base, *s]) for s in shard]
    jobs = executor.submit_array(calls)
    print(f"submitted {len(jobs)} tasks: {jobs[0].job_id.split('_')[0]}; watch with: nti status {args.output}")
    sys.exit(0)


if __name__ == "__main__":
    main()
