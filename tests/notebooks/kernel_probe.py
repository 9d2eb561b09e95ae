"""Run cells in a fresh safe-zone kernel; print one JSON line of what each cell did.

A script rather than a helper module: the boundary test runs it as another OS account
(``runuser``), so that account's own Jupyter client starts the kernel as itself. Reads
``{"kernel": NAME, "cells": [CODE, ...], "timeout": S}`` on stdin; the kernelspec is found
on ``$JUPYTER_PATH``. Each cell's record: ``status`` ("ok" or "error"), ``ename``,
``evalue``, ``stdout`` and the MIME types of its displayed outputs.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def run_cells(kernel: str, cells: list[str], timeout: float) -> list[dict[str, Any]]:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    out: list[dict[str, Any]] = []
    try:
        kc.wait_for_ready(timeout=timeout)
        for code in cells:
            seen: dict[str, Any] = {"stdout": "", "mime": []}

            def hook(msg: dict[str, Any], seen: dict[str, Any] = seen) -> None:
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    seen["stdout"] += content["text"]
                elif kind in ("display_data", "execute_result"):
                    seen["mime"].extend(content["data"])

            reply = kc.execute_interactive(code, output_hook=hook, timeout=timeout)["content"]
            out.append(
                {
                    "status": reply["status"],
                    "ename": reply.get("ename"),
                    "evalue": reply.get("evalue"),
                    **seen,
                }
            )
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return out


if __name__ == "__main__":
    ask = json.load(sys.stdin)
    print(json.dumps(run_cells(ask["kernel"], ask["cells"], float(ask.get("timeout", 60)))))
