"""The commands layer: the CLI and its subcommands (evaluate, export, plan, prefetch, slurm-args)."""
