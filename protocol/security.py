"""CURVE: ZeroMQ's built-in encryption and authentication, for tcp:// endpoints.

    tsqp-keygen server            -> server.key (public), server.key_secret (keep private)
    tsqp-keygen client            -> client.key, client.key_secret

    gpu-server  --curve-secret-key server.key_secret --curve-authorized-keys clients/
    tee-client  --curve-secret-key client.key_secret --curve-server-key server.key

The server accepts only clients whose public key file lies in the authorized folder; any other
client's handshake fails and it gets nothing. Everything on the wire, tensors included, is
encrypted. Key files are ZeroMQ's certificate format (zmq.auth); the secret one is created
0600 from its first byte, and an existing key pair is never overwritten unless asked to.
"""

import argparse
import os
import sys
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.errors import UsageError

CERT = """#   ZeroMQ CURVE {kind} Certificate, made by tsqp-keygen
{warning}
metadata
curve
    public-key = "{public}"
{secret_line}"""


def keygen(folder: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"key name {name!r}: give a plain file name such as 'server' or 'alice'")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the key folder {folder}: {e.strerror}") from None
    public_file, secret_file = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(f) for f in (public_file, secret_file) if f.exists()]
    if existing and not force:
        raise UsageError(f"{' and '.join(existing)} already exist; keeping them (--force makes a new pair)")
    public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
    text = CERT.format(kind="**Secret**", warning="#   Keep private.", public=public, secret_line="")
    write_new(secret_file, text + f'    secret-key = "{secret}"\n', 0o600)
    write_new(public_file, CERT.format(kind="Public", warning="", public=public, secret_line=""), 0o644)
    return public_file, secret_file


def write_new(path: Path, text: str, mode: int) -> None:
    """Write `path` created with `mode` from the first byte (no window where it is readable by others)."""
    path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_keypair(secret_file: str) -> tuple[bytes, bytes]:
    public, secret = load_certificate(secret_file)
    if secret is None:
        raise UsageError(f"{secret_file} holds no secret key: pass the .key_secret file")
    return public, secret


def load_public(public_file: str) -> bytes:
    return load_certificate(public_file)[0]


def load_certificate(path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the key file {path}: {getattr(e, 'strerror', None) or e}") from None


def serve_curve(socket: zmq.Socket, secret_file: str, authorized_dir: str) -> ThreadAuthenticator:
    """Make `socket` a CURVE server that admits only the keys in `authorized_dir`; before bind."""
    if not Path(authorized_dir).is_dir():
        raise UsageError(f"authorized keys folder {authorized_dir} does not exist")
    keys = load_keypair(secret_file)
    auth = ThreadAuthenticator(socket.context)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized_dir))
    socket.curve_publickey, socket.curve_secretkey = keys
    socket.curve_server = True
    return auth


def client_keys(secret_file: str, server_public_file: str) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public): what a CURVE client socket needs before connect."""
    public, secret = load_keypair(secret_file)
    return public, secret, load_public(server_public_file)


def main(argv=None) -> int:
    from tsqp.cli import run_cli

    p = argparse.ArgumentParser(
        prog="tsqp-keygen",
        description="Make a CURVE key pair: NAME.key (public) and "
        "NAME.key_secret (private, mode 0600). Copy a client's NAME.key into the server's "
        "--curve-authorized-keys folder; give clients the server's NAME.key.",
    )
    p.add_argument("name", help="a plain file name, e.g. server, or a client's name")
    p.add_argument("--dir", default=".", help="folder to write the two files into (default: here)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    args = p.parse_args(argv)

    def make() -> int:
        if not zmq.has("curve"):
            raise UsageError("this libzmq was built without CURVE")
        public, secret = keygen(Path(args.dir), args.name, args.force)
        print(f"public key  {public}\nsecret key  {secret}  (keep private)")
        return 0

    return run_cli("tsqp-keygen", make)


if __name__ == "__main__":
    sys.exit(main())
