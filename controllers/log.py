"""Logging of cumulo-controller: ``--log-format text`` (the default, one readable line per record) or ``json``.

The JSON shape is the host agent's (:mod:`hostagent.log`: ``time``, ``level``, ``logger``, ``msg`` and the
record's ``extra`` fields), so one log pipeline parses both. kopf's per-object loggers put the object they
speak about in ``k8s_ref``; it becomes an ``object`` field (``namespace/name``) with ``kind``.
"""

from __future__ import annotations

import logging
import sys
import typing as t

from hostagent.log import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# kopf's bookkeeping attributes on its records: not fields anybody wants in a log line.
_KOPF_ATTRIBUTES = ("k8s_skip", "k8s_ref", "settings")


class ControllerJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        ref: t.Any = getattr(record, "k8s_ref", None)
        if any(hasattr(record, name) for name in _KOPF_ATTRIBUTES):
            record = logging.makeLogRecord({k: v for k, v in vars(record).items() if k not in _KOPF_ATTRIBUTES})
            if isinstance(ref, dict) and ref.get("name"):
                namespace = ref.get("namespace")
                record.object = f"{namespace}/{ref['name']}" if namespace else ref["name"]
                if ref.get("kind"):
                    record.kind = ref["kind"]
        return super().format(record)


def setup(level: str = "INFO", format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ControllerJsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
