"""Entry point: ``python lightning_cli.py {test,fit,predict} --config configs/<x>.yaml``."""

from patchcore_lightning.startup import prepare_process

prepare_process()  # before Lightning is imported: no Triton (patchcore_lightning/startup.py)

from patchcore_lightning.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
