"""`python -m lightning_falcon fit --config configs/tiny.yaml`: builds the CLI and nothing else."""

from lightning_falcon.cli import main

if __name__ == "__main__":
    main()
