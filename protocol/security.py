"""CURVE: ZeroMQ's built-in encryption and authentication, for tcp:// endpoints.

    tsqp-keygen server            -> server.key (public), server.key_secret (keep private)
    tsqp-keygen client            -> client.key, client.key_secret

    gpu-server  --curve-secret-key server.key_secret --curve-authorized-keys clients/
    tee-client  --curve-secret-key client.key_secret --curve-server-key server.key

The server accepts only clients whose public key file lies in the authorized folder; any other
client's handshake fails and it gets nothing. Everything on the wire, tensors included, is
encrypted. Key files are ZeroMQ's certificate format (zmq.auth).
"""

import argparse
import os
import sys
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def keygen(folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keypair(secret_file: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key: pass the .key_secret file")
    return public, secret


def load_public(public_file: str) -> bytes:
    return zmq.auth.load_certificate(public_file)[0]


def serve_curve(socket: zmq.Socket, secret_file: str, authorized_dir: str) -> ThreadAuthenticator:
    """Make `socket` a CURVE server that admits only the keys in `authorized_dir`; before bind."""
    if not Path(authorized_dir).is_dir():
        raise ValueError(f"authorized keys folder {authorized_dir} does not exist")
    auth = ThreadAuthenticator(socket.context)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized_dir))
    socket.curve_publickey, socket.curve_secretkey = load_keypair(secret_file)
    socket.curve_server = True
    return auth


def client_keys(secret_file: str, server_public_file: str) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public): what a CURVE client socket needs before connect."""
    public, secret = load_keypair(secret_file)
    return public, secret, load_public(server_public_file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="tsqp-keygen",
        description="Make a CURVE key pair: NAME.key (public) and "
        "NAME.key_secret (private, mode 0600). Copy a client's NAME.key into the server's "
        "--curve-authorized-keys folder; give clients the server's NAME.key.",
    )
    p.add_argument("name", help="e.g. server, or a client's name")
    p.add_argument("--dir", default=".", help="folder to write the two files into (default: here)")
    args = p.parse_args(argv)
    if not zmq.has("curve"):
        print("tsqp-keygen: error: this libzmq was built without CURVE", file=sys.stderr)
        return 1
    public, secret = keygen(Path(args.dir), args.name)
    print(f"public key  {public}\nsecret key  {secret}  (keep private)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
