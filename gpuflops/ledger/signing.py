"""Ed25519 keys and signatures: the only module that imports ``cryptography``.

A node signs every record it ships to the central store with a key kept in its state
directory; a person signs program definitions and decisions with their own key. Keys are raw
32-byte Ed25519 keys; private keys are stored as PKCS#8 PEM, mode 0600.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

NODE_KEY_FILENAME = "node.key"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class KeyFileError(OSError):
    """A key file cannot be read, written or parsed; carries the path."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key and where it came from."""

    path: Path
    _key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)

    @property
    def public_key_hex(self) -> str:
        return self.public_key.hex()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def parse_public_key(text: str) -> bytes:
    """A public key given as 64 hex digits; ValueError otherwise."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"public key must be {2 * PUBLIC_KEY_BYTES} hex digits, got {text!r}") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return raw


def load_key(path: Path) -> SigningKey:
    """Read a PKCS#8 PEM Ed25519 private key; refuses a file others can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(path, f"cannot read key: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise KeyFileError(path, f"key file mode is {mode:04o}; it must not be readable by others "
                              f"(chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(path, f"not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(path, "not an Ed25519 key")
    return SigningKey(path, key)


def generate_key(path: Path) -> SigningKey:
    """Write a new key to ``path`` (mode 0600, atomically); refuses to overwrite one."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            # link() fails if the target exists: two processes never both install a key.
            os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except FileExistsError:
        raise KeyFileError(path, "a key already exists here; it is never overwritten") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot write key: {exc.strerror or exc}") from None
    return SigningKey(path, key)


def load_or_generate(path: Path) -> tuple[SigningKey, bool]:
    """The node key at ``path``, generated on first use; (key, created)."""
    if Path(path).exists():
        return load_key(path), False
    try:
        return generate_key(path), True
    except KeyFileError:
        if Path(path).exists():  # another process won the race
            return load_key(path), False
        raise
