"""``python -m raytitan.train [--job.config_file F] [--section.key value ...]``

Parses and validates the config, then hands it to the Ray launcher. With no Ray address
(``ray.address`` or ``RAY_ADDRESS``) it starts a local Ray instance. Exit codes: 0 finished,
1 failed (or refused: another live run holds the run folder), 2 config error, 75 stopped on
request (SIGTERM/SIGINT) with the stop step committed, 130 aborted by a second SIGINT (see
docs/elastic.md).
"""

from __future__ import annotations

import sys

from raytitan.config.job import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    # Imported here, not at the top: --help and config errors answer without loading Ray.
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from raytitan.components.lease import RunFolderBusy
    from raytitan.ray.launcher import TrainingFailed, TrainingStopped, launch

    try:
        result = launch(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # SIGTERM or SIGINT: 75 once the stop step is committed (docs/elastic.md)
        print(f"training stopped: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingFailed as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    except RunFolderBusy as e:  # another live run writes to this run folder (docs/elastic.md)
        print(f"training refused: {e}", file=sys.stderr)
        return 1
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
