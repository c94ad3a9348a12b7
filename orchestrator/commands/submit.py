"""``orch submit``: resolve, plan, launch on a backend."""

from __future__ import annotations

import click

from orchestrator.commands.common import backend_option, gpus_option, max_parallel_option, set_option


@click.command("submit")
@click.argument("experiments", nargs=-1, required=True, type=click.Path(dir_okay=False))
@backend_option
@gpus_option
@click.option("--nodes", type=int, default=None, help="Number of nodes.")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs (processes) per node.")
@click.option("--partition", default=None, help="Slurm partition (selects the Slurm backend).")
@click.option("--time", "time_", default=None, help="Time limit, Slurm format (e.g. 2-00:00:00).")
@click.option("--cpus-per-task", type=int, default=None)
@click.option("--mem-gb", type=float, default=None)
@click.option("--account", default=None, help="Slurm account.")
@click.option("--qos", default=None, help="Slurm QOS.")
@max_parallel_option
@click.option("--no-wait", is_flag=True, help="Local: fail at once when the GPUs/slots are busy instead of queueing.")
@click.option("--address", default=None, help="Ray: auto | HOST:PORT | ray://HOST:10001.")
@click.option("--hosts", default=None, help="torchrun: comma-separated hosts, one node each (ssh).")
@click.option("--node-rank", type=int, default=None, help="torchrun: start only this node (by hand).")
@click.option("--master-addr", default=None, help="torchrun: address of node 0 (with --node-rank).")
@set_option
@click.option("--dry-run", is_flag=True, help="Print exactly what would run; start and write nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Block until the jobs end, streaming the log.")
def submit_cmd(experiments, backend, gpus, nodes, gpus_per_node, partition, time_, cpus_per_task, mem_gb,
               account, qos, max_parallel, no_wait, address, hosts, node_rank, master_addr, overrides,
               dry_run, wait_) -> int:
    """Launch EXPERIMENTS on a backend and return at once (job ids printed).

    \b
    Examples:
      orch submit exp.yaml                                # local, this machine
      orch submit a.yaml b.yaml c.yaml --gpus 4           # 2 at a time on an 8-GPU node
      orch submit exp.yaml --backend torchrun --nodes 2 --gpus-per-node 8 --dry-run
      orch submit exp.yaml --partition dev --gpus 16      # Slurm, 2 nodes x 8 GPUs
      orch submit exp.yaml --backend ray --address auto --gpus 4
      orch submit exp.yaml --dry-run                      # show the plan only
    """
    from orchestrator.submit import SubmitFlags, submit

    flags = SubmitFlags(
        backend=backend, gpus=gpus, nodes=nodes, gpus_per_node=gpus_per_node, partition=partition,
        time=time_, cpus_per_task=cpus_per_task, mem_gb=mem_gb, max_parallel=max_parallel,
        no_wait=no_wait, address=address, hosts=hosts, node_rank=node_rank, master_addr=master_addr,
        account=account, qos=qos,
    )
    plan, handles = submit(list(experiments), tuple(overrides), flags, dry_run=dry_run)
    if dry_run:
        click.echo(str(plan))
        return 0
    for handle in handles:
        click.echo(f"submitted {handle.job_id} ({plan.backend})")
    if not wait_:
        click.echo("follow with: orch status / orch logs -f JOB")
        return 0
    return _wait(handles)


def _wait(handles) -> int:
    """Block until every job ends, streaming the first job's log; exit 1 if any failed."""
    from orchestrator.jobs import follow_log, load_record
    from orchestrator.spec import JobState

    if len(handles) == 1:
        follow_log(handles[0].job_id)
    failed = 0
    for handle in handles:
        state = handle.wait()
        record = load_record(handle.job_id)
        click.echo(f"{handle.job_id}: {state.value}" + (f" ({record.error})" if record.error else ""))
        failed += state != JobState.SUCCEEDED
        _print_outcome(record)
    return 1 if failed else 0


def _print_outcome(record) -> None:
    """Final metrics (from the job's result.json) and the `mlflow ui` command that shows the run."""
    import json
    from pathlib import Path

    from orchestrator.commands.report_util import mlflow_ui_hint, print_metrics

    result_file = Path(record.output_dir) / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        print_metrics(result.get("metrics", {}), title=f"{record.name}: final metrics")
    hint = mlflow_ui_hint(record.tracking_uri, record.mlflow_run_id)
    if hint:
        click.echo(hint)
