"""``torchrun --nproc_per_node N -m raytitan.worker [--job.config_file F] [--section.key value ...]``:
the per-worker training code without Ray (see ``raytitan.trainer.worker``)."""

from raytitan.trainer.worker import main

if __name__ == "__main__":
    main()
