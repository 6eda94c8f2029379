"""``python -m normlab.kernels build|status``: the fused kernels' cache, without the CLI extra.

``normlab kernels build`` / ``normlab kernels status`` run the same functions.
"""

from __future__ import annotations

import argparse
import sys
import time

from ._build import KernelError, build_kernels, kernel_status

__all__ = ["build", "main", "status"]


def status() -> int:
    """Print where the cache is and whether the kernels are built and usable; 0 when usable."""
    report = kernel_status()
    print(f"cache: {report.cache}")
    print(f"library: {report.library}")
    print(f"built: {'yes' if report.built else 'no'}")
    print(f"usable: {'yes' if report.usable else 'no'}")
    if report.reason:
        print(f"why: {report.reason}")
    return 0 if report.usable else 1


def build() -> int:
    """Compile (if needed) and load the kernels, printing one line; 0 on success."""
    started = time.perf_counter()
    built = kernel_status().built
    try:
        library = build_kernels(announce=False)
    except KernelError as err:
        print(
            f"normlab: fused kernels not built ({err}); backend='auto' uses ATen", file=sys.stderr
        )
        return 1
    how = "already built" if built else f"compiled in {time.perf_counter() - started:.0f} s"
    print(f"normlab: fused kernels ready: {library} ({how})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normlab.kernels", description=__doc__)
    parser.add_argument("command", choices=("build", "status"))
    args = parser.parse_args(argv)
    return build() if args.command == "build" else status()


if __name__ == "__main__":
    raise SystemExit(main())
