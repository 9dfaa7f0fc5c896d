"""Entry point: ``python lightning_cli.py {test,fit,predict} --config configs/<x>.yaml``."""

from patchcore_lightning.lean_imports import skip_triton

skip_triton()  # before Lightning imports torch._dynamo: see patchcore_lightning/lean_imports.py

from patchcore_lightning.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
