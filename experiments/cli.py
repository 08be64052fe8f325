"""The `lightning` command: a LightningCLI over every model and data module (filled in by experiments)."""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI


def main(args: list[str] | None = None) -> None:
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args)


if __name__ == "__main__":
    main()
