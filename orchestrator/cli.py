"""The ``orch`` command line: argument parsing and exit codes, nothing else.

It is the only place that exits the process. Exit codes: 0 success, 1 a job failed, 2 bad input
(one line on stderr saying what was wrong, where, and how to fix it). Every command lives in its
own module under :mod:`orchestrator.commands` and imports torch/ray/mlflow/submitit only inside
the function that needs them, so ``orch --help``, ``orch config`` and ``orch submit --dry-run``
stay fast.
"""

from __future__ import annotations

import sys

import click

from cluster.errors import OrchError
from orchestrator import __version__
from orchestrator.commands.config import config_cmd
from orchestrator.commands.data import data_group
from orchestrator.commands.ensemble import ensemble_cmd
from orchestrator.commands.evaluate import eval_cmd
from orchestrator.commands.jobs import cancel_cmd, logs_cmd, status_cmd
from orchestrator.commands.kfold import kfold_cmd, report_cmd, split_cmd
from orchestrator.commands.predict import predict_cmd
from orchestrator.commands.submit import submit_cmd
from orchestrator.commands.sweep import sweep_cmd
from orchestrator.commands.sync import sync_cmd
from orchestrator.commands.train import train_cmd
from orchestrator.commands.weights import weights_group
from orchestrator.commands.why import why_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="orch")
def cli() -> None:
    """Run object-detection experiments from one YAML file, wherever the compute is.

    \b
    Examples:
      orch config experiments/shapes_demo.yaml --gpus 8
      orch train experiments/shapes_demo.yaml --set optim.lr=0.002
      orch submit exp.yaml --gpus 4                       # local GPU slices
      orch submit exp.yaml --partition dev --gpus 16      # Slurm, 2 nodes x 8 GPUs
      orch kfold exp.yaml --folds 5                       # 5 fold runs + one summary run
      orch sweep exp.yaml                                 # Ray Tune search
      mlflow ui --backend-store-uri sqlite:///mlflow.db   # compare
    """


# Explicit list (no import-time registration).
for _command in (
    config_cmd,
    train_cmd,
    submit_cmd,
    status_cmd,
    logs_cmd,
    cancel_cmd,
    data_group,
    eval_cmd,
    predict_cmd,
    split_cmd,
    kfold_cmd,
    report_cmd,
    ensemble_cmd,
    sweep_cmd,
    sync_cmd,
    weights_group,
    why_cmd,
):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``orch`` console script; returns the exit code."""
    try:
        result = cli.main(args=argv, prog_name="orch", standalone_mode=False)
    except OrchError as err:
        click.echo(f"orch: error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("orch: aborted", err=True)
        return 130
    except click.ClickException as err:
        # One line, like every other error: what was wrong, and where the help is.
        command = getattr(getattr(err, "ctx", None), "command_path", None) or "orch"
        hint = f" (see {command} --help)" if isinstance(err, click.UsageError) else ""
        click.echo(f"orch: error: {err.format_message()}{hint}", err=True)
        return 2 if err.exit_code == 2 or isinstance(err, click.UsageError) else err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("orch: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
