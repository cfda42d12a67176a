"""The `canvas-gateway` command's exit statuses: the codes, the table its --help prints, and
which gRPC status of a failed RPC ends in which."""

from __future__ import annotations

import grpc

EXIT_OK, EXIT_NOT_SENT, EXIT_INVALID, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_FAILED = 0, 1, 2, 3, 4, 5
EXIT_NOT_READ = 6
EXIT_INTERRUPTED = 130
EXIT_STATUS = """\
exit status:
  0    every recipient sent (with --dry-run: every batch planned)
  1    some recipient not sent: rejected, unknown, not attempted, or its Canvas inactive
  2    invalid input: a bad flag, file or row, or the gateway refused the request
       (INVALID_ARGUMENT)
  3    authentication: no token, or the gateway refused it (UNAUTHENTICATED,
       PERMISSION_DENIED)
  4    gateway unavailable (UNAVAILABLE: unreachable, or draining with no resume left)
  5    any other RPC failure (DEADLINE_EXCEEDED, INTERNAL, ...), or a resume under
       --idempotency-key that found the gateway had forgotten the key (stopped at once)
  6    some rows of the recipients file were not read (after more bad rows than
       --max-bad-rows, inside a CSV quote that does not close, or past a read error):
       each is in the results file as NOT_READ with its line; the rows read were sent
  130  interrupted (Ctrl-C): what had a result is in the results file
"""
_RPC_EXITS = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
}
