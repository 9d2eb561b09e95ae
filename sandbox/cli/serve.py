"""``sandbox serve``: run the zone as a service (FastAPI + uvicorn) under its own account.

Researchers, stewards and analysts then hold a URL and a token, never a path. The service is
the only process that opens the zone folder: ``serve`` makes it private (mode 0700, files
0600, umask 077 for what it writes later) and refuses a zone folder another account owns.
Embedded mode (no ``--server``) stays the one-person default and is no trust boundary.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from sandbox.cli.common import ZoneOpt, console, settings


def make_private(root: Path) -> None:
    """Only the service's account may read the zone: folders 0700, files 0600."""
    from foundation.errors import SpecError

    st = root.stat()
    if st.st_uid != os.geteuid():
        raise SpecError(
            "--zone",
            f"{root} belongs to another account (uid {st.st_uid})",
            "run `sandbox serve` as the account that owns the zone",
        )
    os.umask(0o077)
    root.chmod(0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            if not p.is_symlink():
                p.chmod(0o700)
        for f in filenames:
            p = Path(dirpath, f)
            if not p.is_symlink():
                p.chmod(0o600)


def _listen(host: str, port: int) -> socket.socket:
    from foundation.errors import SpecError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SpecError(
            "--port", f"cannot listen on {host}:{port} ({exc.strerror})", "pick another port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def check_tls(cert: Path | None, key: Path | None) -> bool:
    """Both files or neither; they must load as a certificate and its key (say so now, not
    at the first client's handshake)."""
    import ssl

    from foundation.errors import SpecError

    if cert is None and key is None:
        return False
    if cert is None or key is None:
        given, other = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise SpecError(other, f"is missing ({given} was given)", "give both or neither")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except OSError as exc:
        field = "--tls-key" if cert.is_file() else "--tls-cert"
        bad = key if field == "--tls-key" else cert
        raise SpecError(
            field, f"cannot read {bad} ({exc.strerror or exc})", "give a PEM file"
        ) from None
    except ssl.SSLError:
        raise SpecError(
            "--tls-key",
            f"{key} is not the private key of {cert} (or either is not PEM)",
            "give the certificate and its own key, both PEM",
        ) from None
    return True


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        zone: ZoneOpt = None,
        host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8750,
        workers: Annotated[
            int, typer.Option("--jobs", help="jobs the service runs at once", min=1, max=64)
        ] = 2,
        tls_cert: Annotated[
            Path | None, typer.Option("--tls-cert", help="serve HTTPS with this certificate (PEM)")
        ] = None,
        tls_key: Annotated[
            Path | None, typer.Option("--tls-key", help="the certificate's private key (PEM)")
        ] = None,
    ) -> None:
        """Serve the zone over HTTP, or HTTPS with --tls-cert/--tls-key (OpenAPI at /docs);
        jobs run in the service."""
        import logging
        from concurrent.futures import ThreadPoolExecutor

        import uvicorn

        from sandbox.ray_backend import RayBackend
        from sandbox.server.app import create_app
        from sandbox.service import Service
        from sandbox.zone import Zone

        # the service's own settings: the zone and its Ray cluster come from the account
        # that runs it, never from a client
        s = settings(zone)
        tls = check_tls(tls_cert, tls_key)
        # absolute: uvicorn reads them after the service has moved into the zone folder
        certfile = str(tls_cert.resolve()) if tls and tls_cert else None
        keyfile = str(tls_key.resolve()) if tls and tls_key else None
        z = Zone.open(s.zone)
        make_private(z.root)
        # the port is taken first: Ray, starting next, opens many ports of its own and could
        # take this one in the meantime (and a port in use is then a clear error at once)
        listener = _listen(host, port)
        # Ray puts the driver's working folder on its workers' import path: make it the
        # private zone, never a folder a client could write to
        os.chdir(z.root)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zone-job")
        backend = RayBackend(z.root, s.ray_address)
        svc = Service(z, backend, executor=executor)
        try:
            ended = svc.runner.reconcile()
            # Ray starts here, in the main thread, before any request: Ray's own processes
            # die with the *thread* that started them (parent-death signal), and the
            # server's request threads come and go
            took = backend.warm_up()
            console.print(
                f"zone {z.root} served at {'https' if tls else 'http'}://{host}:{port} "
                "(OpenAPI: /docs); "
                f"{len(ended)} job(s) left by a stopped service ended; Ray up in {took:.1f} s"
            )
            logging.basicConfig(level=logging.WARNING)
            config = uvicorn.Config(
                create_app(svc), log_level="warning", ssl_certfile=certfile, ssl_keyfile=keyfile
            )
            uvicorn.Server(config).run(sockets=[listener])
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            svc.close()
            listener.close()
