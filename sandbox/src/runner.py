# kiln's sandbox worker: one persistent interpreter per trajectory, speaking JSON lines with
# kiln over private pipes (requests on fd 3, replies on fd 4). Cells run in one namespace, so
# variables survive between turns. Output is captured and capped here (and again by kiln).
import collections, io, json, os, signal, sys, traceback

_IN = os.fdopen(3, "r", encoding="utf-8")
_OUT = os.fdopen(4, "w", encoding="utf-8")
os.closerange(5, 1024)


def _send(msg, out=_OUT):
    out.write(json.dumps(msg) + "\n")
    out.flush()


def _receive(inp=_IN):
    line = inp.readline()
    if not line:
        os._exit(0)
    return json.loads(line)


class _Capped(io.TextIOBase):
    """Keeps the first and the last `cap` characters written, and counts the rest."""

    def __init__(self, cap):
        self.cap, self.head, self.tail, self.tail_len, self.total = cap, [], collections.deque(), 0, 0
        self.head_len = 0

    def writable(self):
        return True

    def write(self, s):
        s = str(s)
        self.total += len(s)
        if self.head_len < self.cap:
            take = s[: self.cap - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
            s = s[len(take):]
        if s:
            self.tail.append(s)
            self.tail_len += len(s)
            if self.tail_len > 4 * self.cap:
                kept = "".join(self.tail)[-self.cap:]
                self.tail, self.tail_len = collections.deque([kept]), len(kept)
        return self.total

    def text(self):
        head, tail = "".join(self.head), "".join(self.tail)[-self.cap:]
        omitted = self.total - len(head) - len(tail)
        middle = f"\n... [{omitted} characters omitted] ...\n" if omitted > 0 else ""
        return head + middle + tail


class SQLError(Exception):
    """A statement kiln refused or SQLite rejected."""


def _call(msg):
    _send(msg)
    reply = _receive()
    if not reply.get("ok"):
        raise SQLError(reply.get("error", "the SQL tool failed"))
    return reply


def get_db_info():
    """The task database's schema, as the CREATE statements."""
    return _call({"op": "db_info"})["ddl"]


def execute_sql(sql, output_path="result.csv"):
    """Runs one read-only SELECT on the task database, saves the result as CSV at output_path
    (inside the working directory) and returns it as a DataFrame."""
    reply = _call({"op": "sql", "sql": str(sql), "output_path": str(output_path)})
    return pd.read_csv(reply["path"]) if reply["columns"] else pd.DataFrame()


class _CellTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _CellTimeout()


def _run(code, timeout, cap):
    out = _Capped(cap)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    status, error = "ok", None
    try:
        compiled = compile(code, "<cell>", "exec")
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(compiled, _namespace)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _CellTimeout:
        status = "timeout"
        error = f"TimeoutError: the cell ran longer than {timeout:g} s and was interrupted (variables are kept)"
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the worker keeps going
        status = "error"
        lines = traceback.format_exception_only(type(e), e)
        error = lines[-1].strip() if lines else type(e).__name__
    finally:
        sys.stdout, sys.stderr = saved
    return {"op": "done", "status": status, "output": out.text(), "output_chars": out.total, "error": error}


import warnings

warnings.filterwarnings("ignore")
import numpy as np
import pandas as pd

_namespace = {"__name__": "__main__", "pd": pd, "np": np, "get_db_info": get_db_info, "execute_sql": execute_sql}


def _serve(receive=_receive, send=_send, run=_run):
    # The loop holds its own references: a cell that replaces this module's functions does not
    # change how later cells run or are reported. Each reply carries its request's id, so kiln
    # tells a forged or stale reply from the real one.
    send({"op": "ready", "pid": os.getpid()})
    while True:
        request = receive()
        reply = run(request["code"], float(request["timeout"]), int(request["cap"]))
        reply["id"] = request["id"]
        send(reply)


_serve()
