"""Start a real tritonserver on a model repository and keep it serving until SIGINT/SIGTERM.

  python build_scripts/launch_server.py --model-repository DIR --http-port N --grpc-port N --metrics-port N

Ports default to free ones. --prepare only readies the Python backend for this interpreter (set-up).
SIGINT or SIGTERM stops the server within 10 s (the decoding models drained, then SIGTERM, SIGKILL after a grace
period, see launcher.Server.stop),
also during start-up; clients still connected then get an error.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

from specinfer.serving.launcher import check_tools, prepare_backends, start_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", default="model_repository")
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--metrics-port", type=int, default=0)
    ap.add_argument("--tritonserver", help="a tritonserver binary to use instead of the installed one")
    ap.add_argument("--log", help="server log file (default: tritonserver-PORT.log in the temp directory)")
    ap.add_argument("--prepare", action="store_true",
                    help="only prepare the Python backend and check that tritonserver and perf_analyzer run")
    args = ap.parse_args()
    if args.prepare:
        print(f"[server] Python backend ready in {prepare_backends()}")
        for line in check_tools():
            print(f"[server] {line}")
        return

    def stop(signum, _frame):  # only raise: the main thread may be inside Popen.wait, which holds a lock
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server = None
    try:  # a signal during start-up stops the half-started server too (start_server cleans up)
        server = start_server(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                              tritonserver=args.tritonserver, log_path=args.log)
        print(f"[server] ready in {server.started_s:.1f} s: HTTP {server.http_url}  gRPC {server.grpc_url}  "
              f"metrics http://localhost:{server.metrics_port}/metrics  (log {server.log_path}); Ctrl-C stops it",
              flush=True)
        code = server.process.wait()
    except Stop as sig:
        state = "during start-up"
        if server:
            start = time.monotonic()
            code = server.stop()
            state = (f"drained {', '.join(server.drained) or 'nothing'}, tritonserver exit code {code} after "
                     f"{time.monotonic() - start:.1f} s")
        print(f"[server] stopped (signal {sig.args[0]}, {state})", flush=True)
        sys.exit(0)
    print(f"[server] tritonserver exited with code {code}; log {server.log_path}")
    sys.exit(code or 1)


class Stop(Exception):
    """SIGINT or SIGTERM reached the launcher."""


if __name__ == "__main__":
    main()
