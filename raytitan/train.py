"""``python -m raytitan.train [--job.config_file F] [--section.key value ...]``

Parses and validates the config, then hands it to the Ray launcher. With no Ray address
(``ray.address`` or ``RAY_ADDRESS``) it starts a local Ray instance.
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
    from raytitan.ray.launcher import TrainingFailed, launch

    try:
        result = launch(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
