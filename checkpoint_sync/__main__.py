"""``python -m checkpoint_sync``, and the installed ``checkpoint-sync`` command (`run`)."""

import sys


def run() -> int:
    """`cli.main`, imported here rather than at the top: a Ctrl-C while its modules load (the
    first tenth of a second of a run) ended in a traceback of the import machinery, not 130.
    Nothing else is imported before this guard, `signal` included: its import was such a window
    too (``sys`` is built in, loaded before any module)."""
    try:
        import signal

        # Held back while the modules load, a Ctrl-C comes as KeyboardInterrupt once they are:
        # raised inside an extension's own import (pydantic-core's Rust code loading
        # `datetime`), it ended in the extension's panic and its traceback. The mask is then
        # given back as it came: one that a parent blocked SIGINT in (inherited across exec)
        # keeps it blocked.
        inherited = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            from .cli import main
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, inherited)
        return main()
    except KeyboardInterrupt:  # before main() took over: nothing was started, nothing to say
        import signal

        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(run())
