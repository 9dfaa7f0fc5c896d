"""Entry point: ``python lightning_cli.py {fit,test,predict,export} --config configs/<x>.yaml``."""

from patchcore_lightning.cli import main

if __name__ == "__main__":
    main()
