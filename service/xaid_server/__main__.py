"""`xaid serve` / `python -m xaid_server`: parse settings and run the server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from xaid_server.errors import ModelLoadError
from xaid_server.server import serve
from xaid_server.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as exc:
        print(f"xaid serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except ModelLoadError as exc:
        logging.getLogger("xaid_server").error("%s", exc)
        return 1
    except ValueError as exc:  # TLS files or tokens that the settings name but cannot be used
        print(f"xaid serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
