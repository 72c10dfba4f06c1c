"""The error boundary of every fedbridge command line: one clear line for a user error, never a traceback.

Each CLI's ``main()`` runs its Typer app through :func:`run_cli`, with the exception types it knows as user
errors (a bad config, data file, certificate, base model...) and the prefix and exit code each gets. Whatever
escapes a command then ends as exactly one line on stderr that starts with the prefix (``error:``, ``refused:``,
``config error:``...) and holds the exception's message, which names the file and line, the field, or the
host:port. A message of several lines (a data file's bad rows) keeps its first line on the error line and the rest
indented below it, so scripts can still find the one line. An exception that is not a known user error is a bug:
the traceback goes to a log file (never to the terminal, where it could show locals such as keys) and the one line
says where it is.

Exit codes: 1 (:data:`EXIT_FAILED`) a refusal or failure at run time (a coordinator refused, a check failed,
a bug); 2 (:data:`EXIT_USAGE`) bad input the user can fix before running again (config, data, base model,
certificates, arguments); the CLIs document their own others (3: a terminal state kept in the store).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_FAILED = 1
EXIT_USAGE = 2

# (exception types, prefix of the line, exit code), first match wins.
Known = Sequence[tuple[tuple[type[BaseException], ...], str, int]]


def shared_known() -> Known:
    """The user errors of :mod:`fedcommon` that any CLI can meet (config, template, manifest, certificates)."""
    from fedcommon.auditlog import AuditError
    from fedcommon.certs import CertificateError
    from fedcommon.chat import TemplateError, TemplateMismatch
    from fedcommon.csr import EnrolmentRequestError
    from fedcommon.manifest import ManifestMismatch
    from fedcommon.tomlconfig import ConfigError

    # fedcommon.models imports torch (seconds): when nothing imported it, nothing can have raised its error, and an
    # error exit (a bad config file, a missing certificate) should not pay for torch.
    models = sys.modules.get("fedcommon.models")
    target: tuple[type[BaseException], ...] = (models.TargetModuleError,) if models is not None else ()
    return [((ConfigError,), "config error:", EXIT_USAGE),
            ((*target, ManifestMismatch), "base model error:", EXIT_USAGE),
            ((TemplateError, TemplateMismatch, CertificateError, EnrolmentRequestError, AuditError), "error:",
             EXIT_USAGE)]


def os_error_line(e: OSError) -> str:
    """``PATH: what`` for a file the user named (``No such file or directory``), or the error's own words."""
    what = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e)
    return f"{e.filename}: {what}" if e.filename else what


def error_line(prefix: str, message: str) -> str:
    """The one error line (and any indented detail lines) for ``message``."""
    first, *rest = (message.strip() or "(no message)").splitlines()
    return "\n".join([f"{prefix} {first}", *(f"  {line}" for line in rest)])


def _crash_log(prog: str, e: BaseException) -> str:
    """Write ``e``'s traceback to a new private file in the temp folder; return its path ("" if that failed)."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"{prog}-error-{time.strftime('%Y%m%dT%H%M%S')}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"{prog} {' '.join(sys.argv[1:])}\n")
            traceback.print_exception(type(e), e, e.__traceback__, file=f)
        return path
    except OSError:
        return ""


def run_cli(app: Callable[[], object], prog: str, known: Known | Callable[[], Known] = ()) -> NoReturn:
    """Run ``app`` (a Typer app in standalone mode); turn whatever escapes it into one line and an exit code.

    Args:
        app: The CLI's Typer app (called with no arguments: it reads ``sys.argv``).
        prog: The command's name, for the crash log's file name.
        known: The CLI's own user errors, tried before :func:`shared_known` and before ``OSError``; or a function
            returning them, called only when something escaped (so a CLI need not import heavy modules to start).
    """
    try:
        app()
    except SystemExit:
        raise  # click's own exit (usage errors print their own short message) and typer.Exit
    except KeyboardInterrupt:
        print(error_line("error:", "interrupted"), file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # noqa: BLE001 - this is the boundary: nothing gets past it as a traceback
        for types, prefix, code in [*(known() if callable(known) else known), *shared_known()]:
            if isinstance(e, types):
                print(error_line(prefix, str(e)), file=sys.stderr)
                raise SystemExit(code) from None
        if isinstance(e, OSError):
            print(error_line("error:", os_error_line(e)), file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        log = _crash_log(prog, e)
        where = f"; the traceback is in {log}" if log else ""
        first = (str(e).splitlines() or [""])[0][:300]
        print(f"error: unexpected {type(e).__name__}: {first} (a bug in {prog}{where})", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    raise SystemExit(0)
